"""The protection study (issue 32): python -m bench.protection; run.py runs it, report.py reports it."""
