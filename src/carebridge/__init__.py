"""carebridge: turn clinical events into the finance work they imply."""

__version__ = "0.1.0"
