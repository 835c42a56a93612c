"""lineup's library layer: plain Python over arrays, Arrow tables and paths (no Dagster)."""

__version__ = "0.1.0"
