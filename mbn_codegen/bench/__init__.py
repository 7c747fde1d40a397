"""Benchmark reports: tuned vs stock TVM kernels vs the runtimes a user would pick instead; on this
host or on a board over TVM's RPC (board.py). Writes results.json, report.html/.md, PNG plots."""
from __future__ import annotations

from .run import BenchConfig, run_bench  # noqa: F401
