"""Benchmarks for mergekit-ext (not part of the installed package)."""
