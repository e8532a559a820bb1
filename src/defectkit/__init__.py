"""defectkit: industrial visual inspection from good parts, on a plain CPU."""

__version__ = "0.1.0"
