"""Benchmarks: our paths against release-style paths written from method.md (issue 7).

Entry point: ``python -m benchmarks.run`` (``make bench``). See docs/benchmarks.md.
"""
