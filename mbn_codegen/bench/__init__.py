"""Benchmark reports: tuned vs stock TVM kernels vs the runtimes a user would pick instead.

`run_bench(BenchConfig(...))` writes a report folder: results.json (every raw sample, validated
against schema.json), report.md, report.html (self-contained) and PNG plots. The pieces:

- variants.py   what is measured: TVM builds (each just a BuildConfig) and peer runtimes
- worker.py     one subprocess per (variant, thread count): loads one runtime, times it on request
- measure.py    the coordinator: interleaved rounds, statistics
- layers.py     per-kernel timing inside a worker (VM instrument hook + time_evaluator), layer mapping
- peak.py       the machine's measured SGEMM peak and copy bandwidth, and a nominal peak
- provenance.py machine, versions, target, databases, date
- results.py    the results document, written atomically after every step (an interrupted run keeps
                what it measured); schema validation
- report.py / plots.py / compare.py / grid.py   the report, its plots, report-vs-report, alpha x rho
"""
from __future__ import annotations

from .run import BenchConfig, run_bench  # noqa: F401
