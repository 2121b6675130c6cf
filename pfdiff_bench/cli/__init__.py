"""The `pfdiff-bench` command line: a thin click layer over the library.

Every user error (PFDiffError, click usage errors) is printed as one line `error: ...` with exit
status 2 and no traceback (a MissingItems list: that line, then one indented line per item); anything else is a bug
and keeps its traceback. Under torchrun (WORLD_SIZE > 1) an error every rank meets alike is printed once, by
rank 0; an error of one rank's own share of the work (tagged ``only_rank`` by sampling.distributed.own_share) by
that rank, as `error: rank R of W: ...`; a rank that stops because another failed prints nothing.
"""

from __future__ import annotations

import os
import sys

import click

from pfdiff_bench import __version__
from pfdiff_bench.errors import MissingItems, PFDiffError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pfdiff-bench")
def cli() -> None:
    """Reproduce PFDiff and benchmark fast diffusion samplers.

    \b
    Examples:
      pfdiff-bench sample --config toy --nfe 4 --pfdiff 2,1
      pfdiff-bench verify samplers
      pfdiff-bench sample --config imagenet64 --nfe 4
    """


def _register() -> None:
    # Each command module attaches its commands to `cli`; imported here so `cli` is complete.
    from pfdiff_bench.cli import demo, sample, verify  # noqa: F401

    for name in ("models", "engine_cmds", "evaluate", "reproduce", "plot", "tune"):
        try:
            __import__(f"pfdiff_bench.cli.{name}")
        except ModuleNotFoundError as exc:  # a module that does not exist yet is simply absent
            if exc.name != f"pfdiff_bench.cli.{name}":
                raise


_register()


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) otherwise (read from the environment: no torch)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


PEER_WAIT_ENV = "PFDIFF_BENCH_PEER_WAIT_S"  # seconds a non-reporting rank waits before it exits (default 20)


def _peer_wait() -> None:
    """Under torchrun, let the reporting rank print before this one exits: torchrun stops every worker as
    soon as one exits, so a rank that left first could silence rank 0's error line. torchrun ends this
    wait (SIGTERM) as soon as the reporting rank has exited."""
    import time

    try:
        time.sleep(max(0.0, float(os.environ.get(PEER_WAIT_ENV, "20"))))
    except ValueError:
        time.sleep(20)


def _error(message: str, exc: BaseException | None = None, more: tuple[str, ...] = ()) -> None:
    """Print the one-line error (and ``more`` indented lines), once per torchrun job.

    Rank 0 prints an error every rank meets alike; another rank waits for torchrun to stop it and prints
    only if it is still running then (rank 0 did not meet the error). An error of one rank's own share
    (``only_rank``) is printed at once by that rank; ``OtherRankFailed`` is never printed."""
    from pfdiff_bench.errors import OtherRankFailed

    rank, world = _rank_world()
    only = getattr(exc, "only_rank", None)
    if world > 1 and isinstance(exc, OtherRankFailed):
        _peer_wait()  # the failing rank is printing its line
        return
    if world > 1 and only is not None:
        head = f"error: rank {only[0]} of {only[1]}: "
    elif world > 1 and rank != 0:
        _peer_wait()
        head = f"error: rank {rank} of {world}: "
    else:
        head = "error: "
    click.echo(head + _one_line(message), err=True)
    for line in more:
        click.echo(line, err=True)


def _is_dist_error(exc: BaseException) -> bool:
    # a collective of torch.distributed failed: a peer process died (killed, or stopped on its own error)
    dist = sys.modules.get("torch.distributed")
    return _rank_world()[1] > 1 and dist is not None and isinstance(exc, getattr(dist, "DistError", ()))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the click group, turning user errors into exit status 2."""
    try:
        rv = cli.main(args=argv, prog_name="pfdiff-bench", standalone_mode=False)
    except MissingItems as exc:  # a first line saying how many, then one line per item
        _error(exc.message, exc, tuple(f"  - {_one_line(item)}" for item in exc.items)
               + ((f"  note: {_one_line(exc.note)}",) if exc.note else ()))
        sys.exit(2)
    except PFDiffError as exc:
        _error(str(exc), exc)
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError as exc:  # click >= 8.2: bare group shows its help
        click.echo(exc.ctx.get_help())
        sys.exit(0)
    except click.UsageError as exc:
        _error(exc.format_message())
        sys.exit(2)
    except click.ClickException as exc:
        _error(exc.format_message())
        sys.exit(exc.exit_code if exc.exit_code != 1 else 2)
    except RuntimeError as exc:
        if not _is_dist_error(exc):
            raise
        _error("another process of this torchrun job stopped (killed, or failed: see its error line or "
               "torchrun's summary); re-run the same command to resume")
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
