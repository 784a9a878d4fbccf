"""Benchmarks: our paths against release-style paths written from method.md.

Entry point: ``python -m benchmarks.run`` (``make bench``). See docs/benchmarks.md.
"""
