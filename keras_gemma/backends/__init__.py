"""Device-specific speed work, kept out of the model math (`cpu.py`)."""
