"""The table itself: assemble cells with the paper's numbers, write md / csv / tex / json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional



from pfdiff_bench.reproduction.cells import Cell
from pfdiff_bench.reproduction.tables import EXTRA_MARK, TableSpec


# ------------------------------------------------------------------------ the table itself
def assemble(table: TableSpec, cells: list[Cell], auto: Optional[dict] = None,
             metrics: Optional[list] = None) -> dict:
    """Rows of (ours, paper, difference) per NFE, with best-of-group, auto-(k, h) and paper-only rows.

    Exact tables also get, per cell, the paired difference to the baseline (the first row) with its
    standard error (``reproduction.paired``). ``auto``: the output of ``reproduction.tune.auto_picks``
    (per NFE the row ``pfdiff-bench tune`` picked on its pilot batch), shown as its own row.

    ``--seeds K`` (cells with ranges, K > 1): each cell is the mean over its K seed ranges with ``std`` (sample
    standard deviation, ddof=1) and ``ranges`` (every range's value and seed indices); ``metrics``: the
    ``--metrics`` list, whose extra values (IS, KID, precision, recall) become ``extra`` per cell. With K = 1
    and FID only the output is what it was before either option existed."""
    nfes = sorted({c.nfe for c in cells}, key=table.nfe.index if all(n in table.nfe for n in {c.nfe for c in cells})
                  else int)
    by = {(c.row.name, c.nfe): c for c in cells}
    row_names = list(dict.fromkeys(c.row.name for c in cells))
    out_rows = []

    def paper_value(label, nfe):
        vals = table.paper.get(label) or table.paper_only.get(label)
        if vals is None or nfe not in table.nfe:
            return None
        return vals[table.nfe.index(nfe)]

    for name in row_names:
        row = next(r for r in table.rows if r.name == name)
        cells_out = {}
        for n in nfes:
            c = by.get((name, n))
            cells_out[n] = _cell_dict(c, paper_value(name, n))
        out_rows.append({"name": name + (" (default 2,1)" if row.default else "") + (EXTRA_MARK if row.extra else ""),
                         "cells": cells_out})
    if table.best_of:
        grp = table.best_of["group"]
        label = table.best_of["name"]
        members = [r.name for r in table.rows if r.group == grp and r.name in row_names]
        if members:
            cells_out = {}
            for n in nfes:
                vals = [(by[(m, n)].value, m) for m in members if by.get((m, n)) and by[(m, n)].value is not None]
                if vals and len(vals) == len(members):
                    v, winner = min(vals)
                    d = _cell_dict(by[(winner, n)], paper_value(label, n))
                    d["winner"] = winner.split("PFDiff-")[-1]
                    per = {m: by[(m, n)].result.get("rms_per_sample") for m in members if by[(m, n)].result}
                    if table.metric == "exact" and len(per) == len(members) and all(per.values()):
                        from pfdiff_bench.reproduction.paired import best_of

                        _, tied = best_of(per)
                        if len(tied) > 1:  # the winner is not significant: say so instead of naming it
                            d["winner"] = None
                            d["tie"] = [m.split("PFDiff-")[-1] for m in tied]
                elif vals:
                    d = {"status": "incomplete", "paper": paper_value(label, n)}
                else:
                    d = {"status": "not run", "paper": paper_value(label, n)}
                cells_out[n] = d
            out_rows.append({"name": label, "cells": cells_out, "best_of": True,
                             "selection": "per NFE, the variant with the lowest value on the evaluation samples "
                                          "themselves (selection on the test metric)"})
            if auto:
                out_rows.append(_auto_row(auto, by, nfes, out_rows[-1]))
    if table.metric == "exact" and out_rows:
        from pfdiff_bench.reproduction.paired import add_paired

        add_paired(out_rows, nfes, table.rows[0].name)
    for label in table.paper_only:
        out_rows.append({"name": label, "cells": {n: {"status": "paper only", "paper": paper_value(label, n)}
                                                   for n in nfes}})
    res = {"table": table.name, "title": table.title, "metric": table.metric, "nfe": nfes, "rows": out_rows,
           "num_samples": next((c.cfg["sampling"]["num_samples"] for c in cells if c.cfg), table.num_samples),
           "metric_label": _metric_label(table, cells), "protocol": _protocol(table, cells)}
    k = 1 + max((len(c.ranges) for c in cells), default=0)
    if k > 1:
        res["seeds"] = k
        res["seed_ranges"] = [[r * res["num_samples"], (r + 1) * res["num_samples"] - 1] for r in range(k)]
        res["spread"] = "mean ± sample standard deviation (ddof=1) over the seed ranges"
    extra = _extra_fields(metrics)
    if extra:
        res["metrics"] = list(metrics)
        res["extra_fields"] = extra
    return res


EXTRA_LABELS = {"is": ("IS", 2), "kid": ("KID", 4), "precision": ("Precision", 3), "recall": ("Recall", 3)}


def _extra_fields(metrics: Optional[list]) -> list[str]:
    from pfdiff_bench.evaluation.fid import METRIC_FIELDS

    return [f for m in (metrics or [])[1:] for f in METRIC_FIELDS.get(m, ())]


_PROTOCOL_KEYS = ("protocol", "fid_tool", "fid_tool_version", "weights_sha256", "weights_official", "resize",
                  "reference", "reference_sha256", "reference_producer", "reference_resize", "mixed_protocol",
                  "quantization", "num_samples", "label", "small_sample")


def _protocol(table: TableSpec, cells: list[Cell]) -> Optional[dict]:
    """The FID protocol of the table's cells (issue 12 part 5): one dict per distinct protocol, so a table whose
    cells were evaluated differently shows it."""
    if table.metric != "fid":
        return None
    seen = []
    for c in cells:
        if c.result:
            p = {k: c.result.get(k) for k in _PROTOCOL_KEYS}
            if p not in seen:
                seen.append(p)
    return {"fid_tool": table.fid_tool, "mixed_protocol": table.mixed_protocol, "reference": table.reference,
            "summary": protocol_summary(table), "cells": seen}


def protocol_summary(table: TableSpec) -> str:
    """"pytorch-fid, reference cifar10-train" or "pytorch-fid features vs lsun_bedroom reference (adm-tf;
    declared mixed protocol)"; a declared mix that the tool in use does not make is not called mixed."""
    from pfdiff_bench.evaluation import refstats
    from pfdiff_bench.evaluation.tools import family_of, get_tool

    spec = refstats.REFERENCES.get(str(table.reference))
    producer = spec.producer if spec is not None else None
    fam = family_of(producer)
    mixed = table.mixed_protocol and (fam is None or fam != get_tool(table.fid_tool).family)
    if mixed:
        return f"{table.fid_tool} features vs {table.reference} reference ({producer or 'unknown producer'}; " \
               f"declared mixed protocol)"
    return f"{table.fid_tool}, reference {table.reference}"


def _metric_label(table: TableSpec, cells: list[Cell]) -> str:
    if table.metric == "exact":
        return "mean RMS distance to the exact ODE solution"
    labels = {c.result.get("label") for c in cells if c.result}
    return "/".join(sorted(labels)) or "FID"


AUTO_ROW = "DDIM + PFDiff (auto k,h)"


def _auto_row(auto: dict, by: dict, nfes: list, best_row: dict) -> dict:
    """The row whose cell at each NFE is the variant ``tune`` picked; notes how far it is from the best."""
    cells_out = {}
    for n in nfes:
        pick = auto["picks"].get(n)
        c = by.get((pick, n)) if pick else None
        d = _cell_dict(c, None) if c is not None else {"status": "not run", "paper": None}
        if d["status"] == "ok":
            d["pick"] = pick.split("PFDiff-")[-1]
            best = best_row["cells"].get(n, {})
            if best.get("status") == "ok" and best["ours"] > 0:
                d["vs_best"] = d["ours"] / best["ours"] - 1.0
        cells_out[n] = d
    return {"name": AUTO_ROW, "cells": cells_out, "auto": True, "tune": auto.get("summary"),
            "selection": "per NFE, the variant `pfdiff-bench tune` picked on a disjoint pilot batch by distance to "
                         "a high-accuracy solution (no test metric)"}


def _cell_dict(c: Optional[Cell], paper: Optional[float]) -> dict:
    if c is None:
        return {"status": "not run", "paper": paper}
    if c.error:
        return {"status": "n/a", "reason": c.error, "paper": paper}
    if c.value is None:
        return {"status": "not run", "paper": paper}
    d = {"status": "ok", "ours": c.value, "paper": paper, "run_dir": str(c.run_dir)}
    if c.result and c.result.get("small_sample"):
        d["small_sample"] = True  # fewer than 2,048 images (--allow-small): marked in the table
    if c.std is not None:  # --seeds K > 1
        d["std"] = c.std
        d["ranges"] = c.range_values
    if c.extra:  # --metrics
        d["extra"] = dict(c.extra)
        if c.extra_std:
            d["extra_std"] = dict(c.extra_std)
    if c.result and c.result.get("rms_per_sample"):
        d["per_sample"] = list(c.result["rms_per_sample"])  # results.json keeps them (paired statistics)
    if paper is not None:
        d["diff"] = c.value - paper
    return d


SMALL_MARK = " (small n)"


def _fmt_cell(d: dict, digits: int) -> str:
    paper = d.get("paper")
    ptxt = f"{paper:.2f}" if isinstance(paper, (int, float)) else "–"
    if d["status"] == "ok":
        ours = (f"{d['ours']:.{digits}f}" + (f" ± {d['std']:.{digits}f}" if d.get("std") is not None else "")
                + (SMALL_MARK if d.get("small_sample") else ""))
        win = f" [{d['winner']}]" if d.get("winner") else f" [tie: {', '.join(d['tie'])}]" if d.get("tie") else ""
        if d.get("pick"):
            win = f" [{d['pick']}" + (f", {d['vs_best']:+.0%} vs best" if d.get("vs_best") is not None else "") + "]"
        p = d.get("paired")
        if p:
            win += f" ({p['diff_mean']:+.{digits}f} ± {p['se']:.{digits}f}, {p['verdict']})"
        if paper is None:
            return ours + win
        return f"{ours}{win} / {ptxt} ({d['diff']:+.{digits}f})"
    return f"{d['status']} / {ptxt}" if paper is not None else d["status"]


def has_paper(res: dict) -> bool:
    """Whether any cell of the table has a paper number (an exact-metric toy table has none)."""
    return any(d.get("paper") is not None for row in res["rows"] for d in row["cells"].values())


def to_markdown(res: dict) -> str:
    digits = 4 if res["metric"] == "exact" else 2
    cells = "Cells: ours / paper (difference)" if has_paper(res) else "Cells: our value"
    lines = [f"### {res['title']}", "",
             f"{cells}; metric: {res['metric_label']}, {res['num_samples']} samples per cell. "
             "'[k_h]' names the winning PFDiff variant; 'n/a' = the variant cannot run that NFE; "
             "'not run' = not sampled yet.", *_seed_lines(res), *_paired_lines(res), *_protocol_lines(res), "",
             "| Method \\ NFE | " + " | ".join(str(n) for n in res["nfe"]) + " |",
             "|---|" + "---|" * len(res["nfe"])]
    for row in res["rows"]:
        lines.append(f"| {row['name']} | " + " | ".join(_fmt_cell(row["cells"][n], digits) for n in res["nfe"]) + " |")
    for f in res.get("extra_fields", []):  # --metrics: one small table per extra value, same rows and columns
        label, dg = EXTRA_LABELS.get(f, (f, 3))
        lines += ["", f"{label} (ours{', mean ± std over seed ranges' if res.get('seeds') else ''}):", "",
                  "| Method \\ NFE | " + " | ".join(str(n) for n in res["nfe"]) + " |",
                  "|---|" + "---|" * len(res["nfe"])]
        for row in res["rows"]:
            vals = []
            for n in res["nfe"]:
                d = row["cells"][n]
                v, sd = (d.get("extra") or {}).get(f), (d.get("extra_std") or {}).get(f)
                vals.append("–" if v is None else f"{v:.{dg}f}" + (f" ± {sd:.{dg}f}" if sd is not None else ""))
            if any(v != "–" for v in vals):
                lines.append(f"| {row['name']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _seed_lines(res: dict) -> list[str]:
    if not res.get("seeds"):
        return []
    rng = ", ".join(f"{a}-{b}" for a, b in res["seed_ranges"][:3]) + (", ..." if res["seeds"] > 3 else "")
    line = (f"Ours = mean ± sample standard deviation (ddof=1) over {res['seeds']} disjoint seed ranges of "
            f"{res['num_samples']} samples (per-sample seed indices {rng}); results.json keeps every range's value.")
    if res["metric"] == "exact":
        line += " Paired statistics use the per-sample errors of all ranges together."
    return ["", line]


def _paired_lines(res: dict) -> list[str]:
    if res["metric"] != "exact":
        return []
    base = res["rows"][0]["name"] if res["rows"] else "the first row"
    lines = [f"'(d ± se, verdict)': mean paired per-sample difference to {base} (same x_T) ± its standard error; "
             "'better'/'worse' only beyond 2 standard errors, else 'tie'. '[tie: a, b]': no variant of the best-of "
             "row beats the others by 2 standard errors."]
    for row in res["rows"]:
        if row.get("selection"):
            lines.append(f"Row '{row['name']}': {row['selection']}.")
        if row.get("auto"):
            far = [f"NFE {n}: {d['vs_best']:+.0%}" for n, d in row["cells"].items()
                   if d.get("vs_best") is not None and d["vs_best"] > 0.10]
            lines.append("The auto pick is within 10% of the best variant at every NFE." if not far else
                         "The auto pick is more than 10% worse than the best variant at " + ", ".join(far) + ".")
    return ["", *lines]


def _protocol_lines(res: dict) -> list[str]:
    prot = res.get("protocol") or {}
    lines = [f"FID tool: {prot['summary']}."] if prot.get("summary") else []
    for p in prot.get("cells", []):
        lines.append(f"Protocol: {p['protocol']}; {p['fid_tool']} {p['fid_tool_version']}, weights sha256 "
                     f"{str(p['weights_sha256'])[:12]}{'' if p['weights_official'] else ' (unofficial)'}, resize: "
                     f"{p['resize']}; reference {p['reference']} (sha256 {str(p['reference_sha256'])[:12]}, by "
                     f"{p['reference_producer']}); quantisation: {p['quantization']}; {p['label']}, "
                     f"n={p['num_samples']}."
                     + (" SMALL SAMPLE (--allow-small): below 2,048 images, not comparable with published "
                        "numbers; such cells are marked '(small n)'." if p.get("small_sample") else ""))
    return ["", *lines] if lines else []


def to_csv(res: dict) -> str:
    spread = bool(res.get("seeds"))
    extra = res.get("extra_fields", [])
    cols = (["std"] if spread else []) + [x for f in extra for x in ([f, f"{f}_std"] if spread else [f])]
    out = ["method,nfe,status,ours,paper,diff,winner" + "".join(f",{c}" for c in cols)]
    for row in res["rows"]:
        for n in res["nfe"]:
            d = row["cells"][n]
            vals = [d.get("ours"), d.get("paper"), d.get("diff")]
            more = ([d.get("std")] if spread else []) + [
                x for f in extra for x in ([(d.get("extra") or {}).get(f), (d.get("extra_std") or {}).get(f)]
                                           if spread else [(d.get("extra") or {}).get(f)])]
            out.append(",".join([f'"{row["name"]}"', str(n), d["status"],
                                 *["" if v is None else f"{v:.6g}" for v in vals], d.get("winner") or d.get("pick") or "",
                                 *["" if v is None else f"{v:.6g}" for v in more]]))
    return "\n".join(out) + "\n"


def to_latex(res: dict) -> str:
    digits = 4 if res["metric"] == "exact" else 2
    cols = "l" + "c" * len(res["nfe"])
    lines = [r"\begin{tabular}{" + cols + "}", r"\toprule",
             "Method & " + " & ".join(f"NFE {n}" for n in res["nfe"]) + r" \\", r"\midrule"]
    for row in res["rows"]:
        cells = []
        for n in res["nfe"]:
            d = row["cells"][n]
            p = d.get("paper")
            ptxt = f"{p:.2f}" if isinstance(p, (int, float)) else "--"
            ours = (f"{d['ours']:.{digits}f}" + (f" $\\pm$ {d['std']:.{digits}f}" if d.get("std") is not None else "")
                    if d["status"] == "ok" else d["status"])
            cells.append(f"{ours} ({ptxt})" if p is not None else ours)
        name = row["name"].replace("_", r"\_").replace("&", r"\&")
        lines.append(name + " & " + " & ".join(c.replace("_", r"\_") for c in cells) + r" \\")
    summary = (res.get("protocol") or {}).get("summary")
    lines += [r"\bottomrule", r"\end{tabular}",
              f"% {'ours (paper)' if has_paper(res) else 'ours'}; {res['metric_label']}"
              + (f"; FID tool: {summary}" if summary else "")]
    return "\n".join(lines) + "\n"


def write_outputs(res: dict, out: Path, stem: str = "") -> list[Path]:
    """table{stem}.md/.csv/.tex and results{stem}.json, each written atomically (temporary name, rename).

    A subset run (``--rows``/``--nfe``) passes ``stem="-subset-..."`` so that it never replaces the full
    table's files (issue 10 item 11)."""
    from pfdiff_bench.files import write_bytes_atomic

    out.mkdir(parents=True, exist_ok=True)
    files = {f"table{stem}.md": to_markdown(res), f"table{stem}.csv": to_csv(res), f"table{stem}.tex": to_latex(res),
             f"results{stem}.json": json.dumps(res, indent=1, default=str) + "\n"}
    paths = []
    for name, text in files.items():
        write_bytes_atomic(out / name, text.encode())  # replaces a symlink at the name, never writes through it
        paths.append(out / name)
    return paths
