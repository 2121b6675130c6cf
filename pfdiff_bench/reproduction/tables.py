"""Table specs: a paper table as data (``configs/tables/*.yaml``): base config, rows, NFE columns, metric,
reference, sample count and the paper's numbers, validated once when loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from pfdiff_bench.config import CONFIG_DIR
from pfdiff_bench.errors import ConfigError



TABLE_DIR = CONFIG_DIR / "tables"
_TABLE_KEYS = {"name", "title", "config", "metric", "reference", "fid_tool", "mixed_protocol", "num_samples", "nfe", "rows", "best_of", "paper",
               "paper_only", "gpu_seconds_per_image_nfe", "description", "nfe_axis", "notes", "protocol",
               "overrides"}
_ROW_KEYS = {"name", "sampler", "group", "default", "extra"}
EXTRA_MARK = " (extra, not in paper)"   # rows the paper does not report (e.g. the baselines of issue 16)


@dataclass
class Row:
    name: str
    sampler: dict
    group: Optional[str] = None
    default: bool = False
    extra: bool = False


@dataclass
class TableSpec:
    name: str
    title: str
    config: str
    metric: str
    nfe: list[int]
    rows: list[Row]
    num_samples: int
    reference: Optional[str] = None
    fid_tool: Optional[str] = None  # the FID tool the paper used for this table (evaluation.tools)
    mixed_protocol: bool = False    # the paper combined one tool's features with another's reference
    best_of: Optional[dict] = None
    paper: dict = field(default_factory=dict)
    paper_only: dict = field(default_factory=dict)
    gpu_seconds_per_image_nfe: Optional[float] = None
    path: Optional[Path] = None
    # nfe_axis: {offset: 1, label: ...}: network calls of column N are N − offset by default (the SD tables:
    # the official scripts' step lists are the paper's columns minus one, PFDIFF_LDM.md §L9)
    nfe_axis: Optional[dict] = None
    notes: list = field(default_factory=list)
    protocol: Optional[str] = None
    overrides: dict = field(default_factory=dict)   # dotted config keys set for every cell (guidance.scale)


def bundled_tables() -> list[str]:
    return sorted(p.stem for p in TABLE_DIR.glob("*.yaml"))


def load_table(name_or_path: str) -> TableSpec:
    p = Path(name_or_path)
    if not p.is_file():
        p = TABLE_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            raise ConfigError(f"unknown table {name_or_path!r}; bundled: {', '.join(bundled_tables())}")
    from pfdiff_bench.config import check_name, load_yaml_file

    raw = load_yaml_file(p) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    check_name(raw.get("name", p.stem), "name", str(p))  # it becomes results/<name>
    bad = set(raw) - _TABLE_KEYS
    if bad:
        raise ConfigError(f"{p}: unknown key(s) {', '.join(sorted(bad))}; accepted: {', '.join(sorted(_TABLE_KEYS))}")
    for key in ("config", "metric", "nfe", "rows", "num_samples"):
        if key not in raw:
            raise ConfigError(f"{p}: missing key '{key}'")
    if raw["metric"] not in ("fid", "exact"):
        raise ConfigError(f"{p}: metric must be 'fid' or 'exact'")
    if raw["metric"] == "fid" and not raw.get("reference"):
        raise ConfigError(f"{p}: metric fid needs a 'reference'")
    if raw["metric"] == "fid":
        from pfdiff_bench.evaluation.tools import TOOLS

        if raw.get("fid_tool") not in TOOLS:
            raise ConfigError(f"{p}: metric fid needs 'fid_tool', the FID tool the paper used: {' or '.join(TOOLS)} "
                              f"(got {raw.get('fid_tool')!r})")
    rows = []
    for r in raw["rows"]:
        if set(r) - _ROW_KEYS or "name" not in r:
            raise ConfigError(f"{p}: each row needs 'name' (and optional {', '.join(sorted(_ROW_KEYS - {'name'}))})")
        rows.append(Row(r["name"], dict(r.get("sampler") or {}), r.get("group"), bool(r.get("default", False)),
                        bool(r.get("extra", False))))
    ref = str(raw["config"])  # a bundled config name, or a YAML path relative to the table file
    base = p.parent / ref if Path(ref).suffix and (p.parent / ref).is_file() else ref
    paper = {k: list(v) for k, v in (raw.get("paper") or {}).items()}
    for label, vals in {**paper, **(raw.get("paper_only") or {})}.items():
        if len(vals) != len(raw["nfe"]):
            raise ConfigError(f"{p}: paper row {label!r} has {len(vals)} values for {len(raw['nfe'])} NFE columns")
    return TableSpec(name=raw.get("name", p.stem), title=raw.get("title", p.stem), config=str(base),
                     metric=raw["metric"], nfe=[int(n) for n in raw["nfe"]], rows=rows,
                     num_samples=int(raw["num_samples"]), reference=raw.get("reference"),
                     fid_tool=raw.get("fid_tool"), mixed_protocol=bool(raw.get("mixed_protocol", False)),
                     best_of=raw.get("best_of"), paper=paper, paper_only=dict(raw.get("paper_only") or {}),
                     gpu_seconds_per_image_nfe=raw.get("gpu_seconds_per_image_nfe"), path=p,
                     nfe_axis=raw.get("nfe_axis"), notes=list(raw.get("notes") or []), protocol=raw.get("protocol"),
                     overrides=dict(raw.get("overrides") or {}))


def axis_offset(table: TableSpec, nfe_axis: Optional[str] = None) -> int:
    """Column − network calls: the table's offset by default ("scripts"), 0 with ``nfe_axis="calls"``."""
    if nfe_axis not in (None, "scripts", "calls"):
        raise ConfigError(f"--nfe-axis must be 'scripts' or 'calls' (got {nfe_axis!r})")
    if nfe_axis == "calls" or not table.nfe_axis:
        return 0
    return int(table.nfe_axis.get("offset", 0))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
