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
    (default: the bundled copy of the public 252 cases). Each case is rebuilt from its own fields and
    checked for the final sample (within its rtol), the NFE and the time of every network call.
    Prints one line per failure, then `sampler cases: M/N matched`; exit status 1 unless M = N.

    \b
    Example:
      pfdiff-bench verify samplers
      pfdiff-bench verify samplers ../shared/fixtures/samplers/cases.pt
    """
    from pfdiff_bench.samplers.verify import BUNDLED_CASES, iter_results

    total = matched = 0
    for res in iter_results(cases_file or BUNDLED_CASES):
        total += 1
        if res.ok:
            matched += 1
            if verbose:
                click.echo(f"ok    {res.id} (rel. error {res.rel_err:.2e})")
        else:
            click.echo(f"FAIL  {res.id}: {res.detail}")
    click.echo(f"sampler cases: {matched}/{total} matched")
    if total == 0 or matched != total:
        raise SystemExit(1)
