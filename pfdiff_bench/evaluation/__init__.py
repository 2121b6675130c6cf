"""FID / IS evaluation: FID tools (``evaluation.tools``), reference statistics, protocols (docs/EVALUATION.md)."""
