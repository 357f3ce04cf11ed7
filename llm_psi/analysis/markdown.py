"""Markdown tables and the number formats of table.md and the report."""
from __future__ import annotations

import numpy as np


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table padded to fixed width (first column left-aligned, the rest right-aligned)."""
    w = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(r)) + " |"
    sep = "|" + "|".join("-" * (n + 2) if i == 0 else "-" * (n + 1) + ":" for i, n in enumerate(w)) + "|"
    return [line(header), sep] + [line(r) for r in rows]


def fmt(v: float) -> str:
    return f"{v:.1f}" if np.isfinite(v) else "—"


def g3(v: float) -> str:
    return f"{v:.3g}" if np.isfinite(v) else "—"


def ratio(a: float, b: float) -> str:
    return g3(a / b) if b else "—"


def interval(v: float, lo: float, hi: float, show=lambda x: f"{x:.2f}") -> str:
    """'v [lo–hi]', 'v' without an interval, '—' without a value."""
    return "—" if not np.isfinite(v) else show(v) + (f" [{show(lo)}–{show(hi)}]" if np.isfinite(lo) else "")
