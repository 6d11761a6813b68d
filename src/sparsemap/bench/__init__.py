"""Benchmarks of loading strategies: each run in a fresh, measured child process (see measure.py)."""
