"""Two engine settings timed in turn, pair by pair (``python -m bench.engines --pairs N``): the ratio of their
tokens per CPU-second with a 95% interval, unconstrained and under the quota.

The table of ``bench.engines`` times each setting in a block of --repeats runs, one setting after another, and
keeps the median: a host whose speed drifts over minutes moves whole blocks, and two medians carry no interval.
Here, for each batch size, --pairs rounds run A then B (B then A in every other round), each a timed run as in
the table (same prompt, --tokens new tokens per sequence, CPU seconds of the whole process); each round gives
one ratio A / B of tokens per CPU-second, and the ratios' mean has a t-interval over the rounds
(llm_psi.analysis.stats.t_interval). A difference is claimed only where the interval excludes 1.

Writes, in --output-dir: pairs.csv (every timed run: engine, dtype, quantize, batch, constrained, pair, order,
tokens, cpu_s, tokens_per_cpu_s), pairs_summary.csv (batch, constrained, a, b, ratio_mean, ci_lo, ci_hi,
n_pairs) and pairs.md.
"""
from __future__ import annotations

import csv
import os

DEFAULT = "ours-ort:int8,onnxruntime:int8"
OUTPUTS = ("pairs.csv", "pairs_summary.csv", "pairs.md")
RUNS = ["engine", "dtype", "quantize", "batch", "constrained", "pair", "order", "tokens", "cpu_s", "tokens_per_cpu_s"]
SUMMARY = ["batch", "constrained", "a", "b", "ratio_mean", "ci_lo", "ci_hi", "n_pairs"]


def parse(text: str, engines) -> list[tuple[str, str, str]]:
    """'ENGINE:QUANT,ENGINE:QUANT' (QUANT none or int8; float32 weights) -> two (engine, dtype, quantize);
    ValueError (one line) otherwise."""
    out = []
    for part in (text or "").split(","):
        engine, _, quant = part.strip().partition(":")
        if engine not in engines or quant not in ("none", "int8"):
            raise ValueError(f"bad --pair {text!r}: two ENGINE:QUANT, ENGINE one of {', '.join(engines)}, QUANT "
                             f"none or int8 (e.g. {DEFAULT})")
        out.append((engine, "float32", quant))
    if len(out) != 2 or out[0] == out[1]:
        raise ValueError(f"bad --pair {text!r}: two different settings, e.g. {DEFAULT}")
    return out


def name(setting) -> str:
    return f"{setting[0]} {setting[1]}/{setting[2]}"


def measure(args, constrained: bool, runner, timed, log) -> list[dict]:
    """Every batch size x --pairs rounds of the two settings in turn (runner and timed from bench.engines)."""
    pair = parse(args.pair, args.engine_names)
    runs = {s: runner(*s, args.tiny) for s in pair}
    for s in pair:
        for b in sorted({1, max(args.batches)}):
            runs[s](b, 2, 0)       # warm-up, untimed
    rows = []
    for b in args.batches:
        for k in range(args.pairs):
            for order, s in enumerate(pair if k % 2 == 0 else pair[::-1]):
                n, _, cpu = timed(lambda: runs[s](b, args.tokens, k + 1))
                if n != b * args.tokens:
                    raise RuntimeError(f"{name(s)} batch {b}: {n} tokens, expected {b * args.tokens}")
                rows.append(dict(engine=s[0], dtype=s[1], quantize=s[2], batch=b, constrained=constrained, pair=k,
                                 order=order, tokens=n, cpu_s=round(cpu, 4), tokens_per_cpu_s=round(n / cpu, 3)))
        log(args, f"pairs: batch {b}{' (quota)' if constrained else ''}: {args.pairs} rounds")
    return rows


def summarize(rows: list[dict], pair) -> list[dict]:
    """Per batch size and constraint: the mean of the per-round ratios A / B and its 95% t-interval."""
    from llm_psi.analysis import stats
    a, b = (name(s) for s in pair)
    by = {}
    for r in rows:
        key = (int(r["batch"]), str(r["constrained"]) in ("True", "true", "1"), int(r["pair"]))
        by.setdefault(key, {})[f"{r['engine']} {r['dtype']}/{r['quantize']}"] = float(r["tokens_per_cpu_s"])
    ratios = {}
    for (batch, constrained, _), got in sorted(by.items()):
        if a in got and b in got:
            ratios.setdefault((batch, constrained), []).append(got[a] / got[b])
    out = []
    for (batch, constrained), rs in ratios.items():
        mean, lo, hi = stats.t_interval(rs)
        out.append(dict(batch=batch, constrained=constrained, a=a, b=b, ratio_mean=round(mean, 4),
                        ci_lo=round(lo, 4), ci_hi=round(hi, 4), n_pairs=len(rs)))
    return out


def write(out_dir: str, rows: list[dict], pair) -> str:
    """pairs.csv, pairs_summary.csv and pairs.md; returns the table's text."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(rows, pair)
    for fname, data, cols in (("pairs.csv", rows, RUNS), ("pairs_summary.csv", summary, SUMMARY)):
        with open(os.path.join(out_dir, fname), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(data)
    a, b = (name(s) for s in pair)
    lines = [f"Tokens per CPU-second, {a} / {b}, rounds in turn (mean ratio, 95% t-interval):", "",
             "| batch | constrained | ratio | 95% interval | pairs | resolved |", "|---:|---|---:|---|---:|---|"]
    for s in summary:
        resolved = "above 1" if s["ci_lo"] > 1 else "below 1" if s["ci_hi"] < 1 else "no"
        lines.append(f"| {s['batch']} | {'quota' if s['constrained'] else 'no'} | {s['ratio_mean']:.3f} | "
                     f"[{s['ci_lo']:.3f}–{s['ci_hi']:.3f}] | {s['n_pairs']} | {resolved} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "pairs.md"), "w") as f:
        f.write(text)
    return text
