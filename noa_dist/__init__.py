"""noa-dist: distributed trainer for the Neural Operator Agent (U-AFNO) on Well-format data."""

__version__ = "0.1.0"
