"""workbench: curate an image set in a DuckDB catalog and train Stable Diffusion on it."""

__version__ = "0.1.0"
