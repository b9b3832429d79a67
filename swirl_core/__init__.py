"""SWiRL data factory: the plain library (no Prefect imports)."""

__version__ = "0.1.0"
