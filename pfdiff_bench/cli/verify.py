import click
from pfdiff_bench.cli import cli

@cli.group()
def verify():
    """Check this implementation against the official code's reference outputs."""
