"""Sampling: config -> model + schedule + plan (:mod:`.setup`), the seeded, sharded, resumable loop
(:mod:`.engine`, :mod:`.distributed`), the run-directory format and its readers (:mod:`.rundir`) and
exports (:mod:`.export`). Import the submodules directly; this face stays empty so it imports nothing heavy."""
