"""Paired statistics for exact-metric tables (issue 12 part 6).

Every cell of an exact table starts from the same x_T, so two methods are compared sample by sample:
d_i = err_i(method) - err_i(baseline). The table reports mean(d) with its standard error
SE = std(d, ddof=1) / sqrt(n), and calls a method better (worse) than the baseline only when
mean(d) < -2 SE (> 2 SE); otherwise "tie". The best-of-group winner is named only when it beats every
other member of the group by more than 2 SE of their paired difference; otherwise the members within
2 SE of the best are listed as tied. Pure Python: no torch needed to build a table.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

Z = 2.0  # the "two standard errors" rule


def paired(errs: Sequence[float], base: Sequence[float]) -> Optional[dict]:
    """mean/SE of the per-sample difference ``errs - base`` and the verdict, or None if not comparable."""
    if not errs or not base or len(errs) != len(base):
        return None
    d = [float(a) - float(b) for a, b in zip(errs, base)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n) if n > 1 else float("inf")
    verdict = "better" if mean < -Z * se else "worse" if mean > Z * se else "tie"
    return {"diff_mean": mean, "se": se, "n": n, "frac_better": sum(v < 0 for v in d) / n, "verdict": verdict}


def add_paired(rows: list[dict], nfes: list, baseline: str) -> None:
    """Give every ok cell of every non-baseline row a ``paired`` entry against row ``baseline``."""
    base = next((r for r in rows if r["name"].split(" (default")[0] == baseline), None)
    if base is None:
        return
    for row in rows:
        if row is base:
            continue
        for n in nfes:
            d, b = row["cells"][n], base["cells"].get(n, {})
            if d.get("status") == "ok" and b.get("status") == "ok":
                p = paired(d.get("per_sample"), b.get("per_sample"))
                if p is not None:
                    d["paired"] = p


def best_of(members: dict) -> tuple[str, list[str]]:
    """``members``: name -> per-sample errors. Returns (best by mean, names tied with it within 2 SE,
    the best first); the list has one name exactly when the winner is significant."""
    means = {m: sum(v) / len(v) for m, v in members.items()}
    best = min(means, key=means.get)
    tied = [best] + [m for m in members if m != best
                     and (paired(members[best], members[m]) or {"verdict": "tie"})["verdict"] != "better"]
    return best, tied
