"""EAFO numerics (placeholder, being written)."""
