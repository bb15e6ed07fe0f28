"""Benchmarks: each prints a ratio against a baseline measured in the same run.

Run one with ``python -m cxr_core bench NAME --json`` or ``python -m bench.NAME``.
"""
