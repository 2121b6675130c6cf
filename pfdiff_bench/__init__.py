"""pfdiff-bench: reproduce PFDiff (ICLR 2025, arXiv 2408.08822) and benchmark it against fast samplers."""

__version__ = "0.1.0"
