"""Errors that mean "the user asked for something we refuse": the CLI prints them as one line, exit 2."""


class PFDiffError(Exception):
    """Base class for user-facing errors (bad config, impossible NFE, missing checkpoint, ...)."""


class ConfigError(PFDiffError):
    """A configuration file or option is invalid."""


class GridError(PFDiffError):
    """A sampler/NFE/grid combination the official code would not finish cleanly."""


class CheckpointError(PFDiffError):
    """A checkpoint or statistics file is missing, corrupt, or of the wrong network."""
