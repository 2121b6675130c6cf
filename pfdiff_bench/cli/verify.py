from pathlib import Path

import click

from pfdiff_bench.cli import cli

@cli.group()
def verify():
    """Check this implementation against the official code's reference outputs."""


@verify.command("samplers")
@click.argument("cases_file", required=False, type=click.Path(dir_okay=False))
@click.option("--verbose", "-v", is_flag=True, help="Also print one line per passing case.")
def verify_samplers(cases_file, verbose):
    """Run every case of a sampler-fixtures file through this library.

    CASES_FILE is a `pfdiff-sampler-cases/1` file of reference outputs of the official PFDiff code
    (default: every bundled file: the public 252 PFDiff-repo cases of the ddim, guided and dpm_solver
    codebases, the 405 baseline cases of UniPC, DPM-Solver++(3M), tAB-DEIS and iPNDM, and the 174 Stable
    Diffusion `ldm` cases). Each case is rebuilt from its own fields and checked for the final sample
    (within its rtol), the NFE, the time of every network call and (ldm) the batch rows of every call.
    Prints one line per failure, `<codebase> cases: M/N matched` per codebase, then `sampler cases: M/N
    matched` per file; exit status 1 unless M = N for every file.

    \b
    Example:
      pfdiff-bench verify samplers
      pfdiff-bench verify samplers ../shared/fixtures/samplers/cases.pt
      pfdiff-bench verify samplers ../shared/fixtures/samplers_baselines/cases.pt
      pfdiff-bench verify samplers ../shared/fixtures/samplers_ldm/cases.pt
    """
    from pfdiff_bench.samplers.verify import BUNDLED_FILES, iter_results

    failed = False
    for path in ([cases_file] if cases_file else BUNDLED_FILES):
        total = matched = 0
        per: dict = {}
        for res in iter_results(path):
            total += 1
            got = per.setdefault(res.codebase, [0, 0])
            got[1] += 1
            if res.ok:
                matched += 1
                got[0] += 1
                if verbose:
                    click.echo(f"ok    {res.id} (rel. error {res.rel_err:.2e})")
            else:
                click.echo(f"FAIL  {res.id}: {res.detail}")
        for codebase, (m, n) in per.items():
            click.echo(f"{codebase} cases: {m}/{n} matched")
        click.echo(f"sampler cases: {matched}/{total} matched" + (f" ({Path(path).name})" if not cases_file else ""))
        failed |= total == 0 or matched != total
    if failed:
        raise SystemExit(1)
