"""Shared test helpers (tiny random checkpoints of real architectures)."""
