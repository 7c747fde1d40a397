"""Benchmark reports: tuned vs stock TVM kernels vs the runtimes a user would pick instead.
`run_bench(BenchConfig(...))` writes a folder with results.json (validated against schema.json),
report.html (self-contained), report.md (the headline) and PNG plots."""
from __future__ import annotations

from .run import BenchConfig, run_bench  # noqa: F401
