"""Start-up cost of the CLI (issue 13 part 3): CPU seconds of `pfdiff-bench --help` and friends.

A benchmark, not a test: run it on a quiet machine, e.g.

    PYTHONPATH=$PWD python benchmarks/startup.py            # 5 repeats, median CPU seconds
    PYTHONPATH=$PWD python benchmarks/startup.py --repeat 10

CPU time (user + system of the child process, from ``os.wait4``) is measured rather than wall time so
that a busy machine inflates the figure less. The target is < 1 s for `--help`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

COMMANDS = {
    "--help": ["--help"],
    "sample --help": ["sample", "--help"],
    "--version": ["--version"],
}


def cpu_seconds(args: list[str]) -> float:
    proc = subprocess.Popen([sys.executable, "-m", "pfdiff_bench.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pfdiff-bench {' '.join(args)} failed")
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--limit", type=float, default=1.0, help="CPU seconds `--help` should stay under")
    opts = ap.parse_args()
    results = {}
    for name, args in COMMANDS.items():
        runs = [cpu_seconds(args) for _ in range(opts.repeat)]
        results[name] = statistics.median(runs)
        print(f"pfdiff-bench {name:<16} median {results[name]:.3f} s CPU  (min {min(runs):.3f}, n={len(runs)})")
    verdict = "ok" if results["--help"] < opts.limit else "SLOW"
    print(f"--help: {results['--help']:.3f} s CPU against a {opts.limit} s target: {verdict}")


if __name__ == "__main__":
    main()
