"""Benchmarks: `python -m bench` (or `make bench`), never part of `make test`.

Every figure is measured against its own baseline in the same run and reported as a ratio, with the machine
it ran on; see README.md, "Benchmarks".
"""
