"""Benchmarks against the physical limits: ``python -m bench <name> [--quick]``, ``python -m bench plot``.

See docs/benchmarks.md for what each one measures, how, and the figures on the reference machine.
"""
