"""Cluster job arrays for a table through submitit (issue 18): one job per group of cells, each running
:func:`runner.run_table` over its ranks, the same code path as ``torchrun ... reproduce TABLE``.

``slurm`` submits a SLURM job array (``submitit.AutoExecutor(cluster="slurm")``: one node per job,
G tasks of one GPU each); ``local`` uses submitit's LocalExecutor (subprocesses on this machine, for
tests and single boxes). A later ``reproduce TABLE`` (or ``--wait``) finds every cell sampled and
evaluated and writes the table; nothing here schedules work itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pfdiff_bench.errors import ConfigError, PFDiffError

from pfdiff_bench.reproduction.cells import Cell, _complete
from pfdiff_bench.reproduction.tables import TableSpec

LAUNCHERS = ("local", "slurm")


@dataclass
class JobRequest:
    """Everything a job needs to re-plan the table and run its own cells (pickled by submitit)."""
    table: TableSpec
    out: str
    plan: dict                      # keyword arguments of cells.plan_cells (besides table, out)
    run_dirs: list[str]             # the cells of this job, by run directory
    shard_size: Optional[int] = None
    eval: dict = field(default_factory=dict)  # inception_weights, trust_weights


def parse_time(text: str) -> int:
    """``HH:MM`` -> minutes (SLURM's time limit)."""
    m = re.fullmatch(r"(\d+):([0-5]\d)", text or "")
    if not m:
        raise ConfigError(f"--slurm-time must be HH:MM (e.g. 04:00), got {text!r}")
    minutes = int(m.group(1)) * 60 + int(m.group(2))
    if minutes < 1:
        raise ConfigError("--slurm-time must be at least 00:01")
    return minutes


def pending(table: TableSpec, cells: list[Cell], metrics: Optional[list] = None) -> list[Cell]:
    """Runnable cells (every seed range its own) not yet sampled or not yet evaluated (by the recorded
    entries: job planning only; the jobs and the final ``reproduce`` check the full cache key)."""
    from pfdiff_bench.reproduction.cells import all_cells
    from pfdiff_bench.reproduction.runner import recorded_result, table_metrics

    ms = table_metrics(table, metrics)
    return [c for c in all_cells(cells) if c.cfg is not None and
            (not _complete(c) or any(recorded_result(c, m) is None for m in ms))]


def groups(cells: list[Cell], per_job: int) -> list[list[Cell]]:
    if per_job < 1:
        raise ConfigError(f"--cells-per-job must be at least 1 (got {per_job})")
    return [cells[i:i + per_job] for i in range(0, len(cells), per_job)]


def run_job(req: JobRequest) -> dict:
    """Job body: join the job's process group (one task per GPU), run this job's cells with run_table."""
    from pfdiff_bench.reproduction.cells import plan_cells
    from pfdiff_bench.reproduction.runner import run_table
    from pfdiff_bench.sampling.distributed import dist_from_env
    from pfdiff_bench.sampling.setup import resolve_device

    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        # RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT for env:// init; every task keeps all the job's GPUs
        # visible and picks cuda:LOCAL_RANK, as under torchrun
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    from pfdiff_bench.reproduction.cells import all_cells

    cells = plan_cells(req.table, Path(req.out), **req.plan)
    mine = [c for c in all_cells(cells) if str(c.run_dir) in set(req.run_dirs)]
    for c in mine:  # each seed range is a run of its own here; the final reproduce aggregates them
        c.ranges = []
    if req.shard_size:
        for c in mine:
            c.cfg["sampling"]["shard_size"] = req.shard_size
    d = dist_from_env(resolve_device(mine[0].cfg["sampling"]["device"]).type)
    try:
        done = run_table(req.table, mine, log=lambda m: print(m, flush=True), dist_ctx=d, progress=False,
                         **req.eval)
    finally:
        d.close()
    return {"rank": d.rank, "cells": req.run_dirs, **done}


def submit(table: TableSpec, out: Path, cells: list[Cell], plan: dict, *, launcher: str, gpus_per_job: int = 1,
           cells_per_job: int = 1, slurm_partition: Optional[str] = None, slurm_time: str = "04:00",
           shard_size: Optional[int] = None, eval_kwargs: Optional[dict] = None) -> list:
    """Submit one job per group of pending cells; returns the submitit jobs (empty when nothing is left)."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}; use one of {', '.join(LAUNCHERS)}")
    if gpus_per_job < 1:
        raise ConfigError(f"--gpus-per-job must be at least 1 (got {gpus_per_job})")
    if launcher == "slurm" and not slurm_partition:
        raise ConfigError("--launcher slurm needs --slurm-partition P")
    minutes = parse_time(slurm_time)
    todo = groups(pending(table, cells, (eval_kwargs or {}).get("metrics")), cells_per_job)
    if not todo:
        return []
    try:
        import submitit
    except ImportError:
        raise PFDiffError("--launcher needs submitit: pip install 'pfdiff-bench[slurm]'") from None
    ex = submitit.AutoExecutor(folder=str(out / "jobs" / "%j"), cluster=launcher)
    params = {"timeout_min": minutes, "tasks_per_node": gpus_per_job, "nodes": 1, "name": f"pfdiff-{table.name}"}
    if launcher == "slurm":
        params.update(gpus_per_node=gpus_per_job, slurm_partition=slurm_partition,
                      cpus_per_task=max(1, (os.cpu_count() or 8) // max(gpus_per_job, 1) // 2))
    ex.update_parameters(**params)
    reqs = [JobRequest(table, str(out), plan, [str(c.run_dir) for c in g], shard_size, dict(eval_kwargs or {}))
            for g in todo]
    return ex.map_array(run_job, reqs)


def wait(jobs: list) -> None:
    """Block until every job ends; a failed job is one error line naming its log folder."""
    failed = []
    for job in jobs:
        try:
            job.results()
        except Exception as exc:  # submitit.core.utils.FailedJobError / UncompletedJobError
            msg = " ".join(str(exc).split())
            failed.append(f"job {job.job_id} ({job.paths.folder}): {msg[-300:]}")
    if failed:
        raise PFDiffError(f"{len(failed)} of {len(jobs)} jobs failed: " + "; ".join(failed))
