"""Pressure-aware resource management for resident LLM services: the suite's package.

Layers, lowest first (tests/test_architecture.py checks them):
  config, cli          every option and its default; the shared argparse helpers
  cgroups              the cgroup filesystem layer, and cells (run, cleanup)
  analysis             metrics, statistics, tables, figures, the pdf: reads files only
  engine, control      the decode loop and batching; pressure sources, the paper's gate, limits
  service              the request lifecycle, the HTTP app, the Prometheus export
  load                 the generator, arrivals, the HTTP client, the co-tenant, the sweep runner
The paper's scripts at the repository root are thin doors into these.
"""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the root scripts live
