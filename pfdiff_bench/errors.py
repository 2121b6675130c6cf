"""Errors that mean "the user asked for something we refuse": the CLI prints them as one line (a list of
missing items: one line per item), exit 2."""

from __future__ import annotations


class PFDiffError(Exception):
    """Base class for user-facing errors (bad config, impossible NFE, missing checkpoint, ...)."""


class ConfigError(PFDiffError):
    """A configuration file or option is invalid."""


class GridError(PFDiffError):
    """A sampler/NFE/grid combination the official code would not finish cleanly."""


class CheckpointError(PFDiffError):
    """A checkpoint or statistics file is missing, corrupt, or of the wrong network."""


class MissingItems(PFDiffError):
    """Several things a run needs are missing (checkpoints, statistics, a GPU, ...).

    ``str()`` is the whole message on one line; the CLI prints ``error: <message>`` and then one indented
    line per item (and a closing note), exit 2, so a long list stays readable.
    """

    def __init__(self, message: str, items, note: str | None = None):
        self.message, self.items, self.note = message, [str(i) for i in items], note
        text = f"{message}: " + " ; ".join(f"({n}) {item}" for n, item in enumerate(self.items, 1))
        super().__init__(text + (f". {note}" if note else ""))


class OtherRankFailed(PFDiffError):
    """Under torchrun: another rank met the error and reports it; this rank stops quietly (exit 2)."""
