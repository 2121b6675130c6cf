"""Start-up cost of the CLI (issue 13 part 3): CPU seconds of `pfdiff-bench --help` and friends.

A benchmark, not a test: run it on a quiet machine, e.g.

    PYTHONPATH=$PWD python benchmarks/startup.py            # 5 repeats, median CPU seconds
    PYTHONPATH=$PWD python benchmarks/startup.py --repeat 10
    python -m benchmarks.run --only startup                  # the same, as a section of the benchmark run

CPU time (user + system of each child process, its own rusage from ``os.wait4``, i.e. what
``resource.getrusage(RUSAGE_CHILDREN)`` adds up per child) is measured rather than wall time so that a
busy machine inflates the figure less. ``python -c pass`` (the bare interpreter) is measured in the same
run, in the same rotating order, as the baseline; the target is < 1 s for `--help`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: name -> argv after the interpreter (the CLI runs as ``python -m pfdiff_bench.cli``, as its script does).
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "--help": ["-m", "pfdiff_bench.cli", "--help"],
    "sample --help": ["-m", "pfdiff_bench.cli", "sample", "--help"],
    "models list": ["-m", "pfdiff_bench.cli", "models", "list"],
    "reproduce toy --dry-run": ["-m", "pfdiff_bench.cli", "reproduce", "toy", "--dry-run"],
}


def cpu_seconds(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"python {' '.join(args)} failed")
    return usage.ru_utime + usage.ru_stime


def run(repeat: int = 5, log=lambda m: None) -> dict:
    """Median CPU seconds of every command over ``repeat`` rounds (each round runs all, rotated)."""
    names = list(COMMANDS)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(cpu_seconds(COMMANDS[name]))
        log(f"startup: round {r + 1}/{repeat}")
    base = statistics.median(runs["python -c pass"])
    rows = [{"command": n if n.startswith("python") else f"pfdiff-bench {n}", "cpu_s": statistics.median(v),
             "min_cpu_s": min(v), "over_python_s": statistics.median(v) - base, "repeats": len(v)}
            for n, v in runs.items()]
    return {"repeats": repeat, "python_cpu_s": base, "help_cpu_s": statistics.median(runs["--help"]),
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--limit", type=float, default=1.0, help="CPU seconds `--help` should stay under")
    opts = ap.parse_args()
    r = run(opts.repeat)
    for row in r["rows"]:
        print(f"{row['command']:<36} median {row['cpu_s']:.3f} s CPU  (+{row['over_python_s']:.3f} over python; "
              f"min {row['min_cpu_s']:.3f}, n={row['repeats']})")
    verdict = "ok" if r["help_cpu_s"] < opts.limit else "SLOW"
    print(f"--help: {r['help_cpu_s']:.3f} s CPU (python -c pass: {r['python_cpu_s']:.3f} s) against a "
          f"{opts.limit} s target: {verdict}")


if __name__ == "__main__":
    main()
