"""The README's shell commands run as written (issue 13, "What it must show").

Every line of every ```bash block of README.md is a command. Each one matches exactly one prefix of
three explicit lists: QUICK (run in the default suite), SLOW (run under ``-m slow``: each takes more than
a few seconds here), SKIPPED (needs a download, a checkpoint, a GPU or a cluster; the reason is given).
A README command that matches no prefix, or more than one, fails ``test_every_readme_command_is_classified``,
so a new README command cannot go untested silently.

How they run: ``bash -c LINE``, the line exactly as written (trailing ``# comment`` included), in a fresh
working directory, with a ``pfdiff-bench`` shim first on PATH: ``exec <this interpreter> -m pfdiff_bench.cli
"$@"`` with PYTHONPATH = this checkout, so the checkout's code runs (not whichever copy a venv's console
script points at). PFDIFF_BENCH_HOME and TORCH_HOME point at empty folders: nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: prefix -> what must be printed (stdout) or exist afterwards ("file:" + path), in README order.
QUICK = {
    "pfdiff-bench sample --config toy --nfe 4 --pfdiff 2,1 -n 1000 --out runs/toy-pf21":
        "file:runs/toy-pf21/manifest.json",
    "pfdiff-bench reproduce table2 --dry-run": "72 cells",
    "pfdiff-bench reproduce table2 --status": "72 cells",
    "pfdiff-bench models list": "cache: ",
    "pfdiff-bench reproduce sd_cfg7.5 --dry-run": "NFE axis",
}
SLOW = {
    "pfdiff-bench sample --config toy --nfe 4 --pfdiff 2,1 -n 2000 --out runs/toy-pf21":
        "file:runs/toy-pf21/manifest.json",
    "pfdiff-bench sample --config toy --sampler dpm-solver++ --multistep --order 2 --nfe 6": "",
    "pfdiff-bench export runs/toy-pf21 toy.npz --png pngs/": "file:toy.npz",
    "pfdiff-bench eval runs/toy-pf21": "",
    "pfdiff-bench reproduce toy ": "file:results/toy/table.md",
    "pfdiff-bench tune --config toy": "",
    "pfdiff-bench verify samplers": "matched",
    "pfdiff-bench verify arch": "15/15 matched",
}
SKIPPED = {
    "make demo": "creates .venv and installs the package with torch (minutes); CI's set-up runs it",
    "make test": "runs this whole test suite",
    "pfdiff-bench sample --config imagenet64": "needs the ADM ImageNet-64 checkpoints (1.4 GB download) and a GPU",
    "torchrun --nproc_per_node 8": "needs 8 GPUs and the ImageNet-64 checkpoints",
    "pfdiff-bench fid runs/in64": "needs an ImageNet-64 run, the Inception weights and reference statistics",
    "pfdiff-bench fid runs/cifar": "needs a CIFAR-10 run, pytorch-fid's weights and reference statistics (downloads)",
    "pfdiff-bench reproduce table2 --launcher slurm": "needs a SLURM cluster (and the checkpoints)",
    "pfdiff-bench reproduce table2 --seeds": "needs the ImageNet-64 checkpoints, a GPU, Inception weights, statistics",
    "pfdiff-bench models download": "downloads a checkpoint",
    "pfdiff-bench sample --config cifar10 --checkpoint my_cifar10.pt": "needs your own weights file and a GPU",
    "pfdiff-bench fid runs/mine": "needs that run, pytorch-fid's weights and reference statistics (downloads)",
    "pfdiff-bench fid runs/toy100 --ref my_stats.npz": "needs your own statistics file and the Inception weights",
    "pfdiff-bench sample --config sd14": "needs the Stable Diffusion v1.4 weights and COCO captions (downloads)",
}


def readme_commands() -> list[str]:
    """Every non-empty, non-comment line of the README's ```bash blocks, in order, as written."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


def _bare(cmd: str) -> str:
    return cmd.split("#")[0].strip() + " "  # prefixes ending in a space match a whole word ("reproduce toy ")


def _matches(cmd: str) -> list[str]:
    return [p for lst in (QUICK, SLOW, SKIPPED) for p in lst if _bare(cmd).startswith(p)]


def test_every_readme_command_is_classified():
    cmds = readme_commands()
    assert len(cmds) >= 20, cmds  # the extraction found the blocks
    bad = {c: _matches(c) for c in cmds if len(_matches(c)) != 1}
    assert not bad, f"README commands in no list or in several (add each to QUICK, SLOW or SKIPPED): {bad}"
    used = {p for c in cmds for p in _matches(c)}
    stale = [p for lst in (QUICK, SLOW, SKIPPED) for p in lst if p not in used]
    assert not stale, f"list entries that match no README command: {stale}"
    assert all(SKIPPED.values())  # every skip says why


def _shim(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "pfdiff-bench"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pfdiff_bench.cli "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT),
            "PFDIFF_BENCH_HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch"),
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run_all(tmp_path: Path, lists: tuple[dict, ...]) -> None:
    env, work = _shim(tmp_path), tmp_path / "work"
    work.mkdir()
    ran = 0
    for cmd in readme_commands():
        found = _matches(cmd)
        if len(found) != 1:  # reported by test_every_readme_command_is_classified
            continue
        prefix = found[0]
        expect = next((lst[prefix] for lst in lists if prefix in lst), None)
        if expect is None:
            continue
        r = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (cmd, r.stderr[-2000:])
        if expect.startswith("file:"):
            assert (work / expect[5:]).is_file(), (cmd, expect)
        else:
            assert expect in r.stdout, (cmd, expect, r.stdout[-2000:])
        ran += 1
    assert ran >= sum(len(lst) for lst in lists), ran


def test_quick_readme_commands_run_as_written(tmp_path):
    _run_all(tmp_path, (QUICK,))


@pytest.mark.slow
def test_all_runnable_readme_commands_run_as_written(tmp_path):
    _run_all(tmp_path, (QUICK, SLOW))  # in README order: the slow ones use the runs the first ones made
