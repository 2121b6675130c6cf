"""Models behind one noise-prediction interface (see `base.py`)."""
