"""bench/engines.py's outputs: the accuracy guard, the summary with its roofline, the CSVs, table and figure."""
from __future__ import annotations

import csv
import json
import os
import statistics

from bench import roofline

SUMMARY = ["engine", "dtype", "quantize", "batch", "constrained", "tokens_per_cpu_s", "roofline_tokens_per_cpu_s",
           "roofline_fraction"]
RUNS = ["engine", "dtype", "quantize", "batch", "constrained", "repeat", "tokens", "wall_s", "cpu_s", "tokens_per_s",
        "tokens_per_cpu_s"]
ACCURACY = ["engine", "dtype", "quantize", "steps", "max_abs_logit_diff", "greedy_agreement", "source", "note"]
GUARDED = [("bfloat16", "none"), ("float32", "int8")]
ORT_GUARDED = [("float32", "none", "ort"), ("float32", "int8", "ort")]   # ours-ort: llm_psi.engine.accuracy
PROMPT = "Explain the theory of relativity."


def _helper():
    """The engine's own guard (``llm_psi.engine.accuracy``), where that module exists."""
    try:
        from llm_psi.engine import accuracy
    except ImportError:
        return None
    return next((getattr(accuracy, n) for n in ("accuracy_guard", "guard", "compare")
                 if callable(getattr(accuracy, n, None))), None)


def _compare(ref, eng, seq, start: int, steps: int) -> dict:
    """Teacher-forced over ``seq`` (prompt + float32 greedy tokens): logits of the ``steps`` positions."""
    import torch
    with torch.inference_mode():
        a = ref.model(seq).logits[0, start - 1:start - 1 + steps].float()
        b = eng.model(seq).logits[0, start - 1:start - 1 + steps].float()
    return {"max_abs_logit_diff": float((a - b).abs().max()),
            "greedy_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def accuracy_guard(tiny: bool, steps: int, make, ort: bool = False) -> list[dict]:
    """Ours in bfloat16 and int8 against float32 (``make(tiny, dtype, quantize)`` builds an engine, raising
    the bench's Skip where it cannot): largest absolute logit difference and share of equal greedy tokens.
    ``ort``: also ours on ONNX Runtime (float32, int8) against our float32, by the engine's own guard."""
    import torch
    ref = make(tiny, "float32", "none")
    ids = ref.encode(PROMPT)
    with torch.inference_mode():
        seq = ref.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                                 min_new_tokens=steps, pad_token_id=ref.tokenizer.eos_token_id)
    out, helper = [], _helper()
    for dtype, quantize in GUARDED:
        row = dict(engine="ours", dtype=dtype, quantize=quantize, steps=steps, max_abs_logit_diff=None,
                   greedy_agreement=None, source="bench", note="")
        try:
            eng = make(tiny, dtype, quantize)
        except Exception as e:  # the bench's Skip: the engine lacks the option
            out.append(dict(row, source="—", note=f"skipped: {e}"))
            continue
        found = None
        if helper is not None:
            try:
                found = helper(ref, eng, steps=steps)
            except TypeError:
                found = None
        if isinstance(found, dict) and {"max_abs_logit_diff", "greedy_agreement"} <= set(found):
            row.update(source="llm_psi.engine.accuracy", max_abs_logit_diff=found["max_abs_logit_diff"],
                       greedy_agreement=found["greedy_agreement"])
        else:
            row.update(_compare(ref, eng, seq, ids.shape[1], steps))
        out.append(row)
        del eng
    return out + (_ort_guard(tiny, steps) if ort else [])


def _ort_guard(tiny: bool, steps: int) -> list[dict]:
    from llm_psi.engine import accuracy
    base = [dict(engine="ours-ort", dtype=d, quantize=q, steps=steps, max_abs_logit_diff=None, greedy_agreement=None,
                 source="llm_psi.engine.accuracy", note="") for d, q, _ in ORT_GUARDED]
    try:
        rows = accuracy.guard(tiny=tiny, steps=steps, variants=ORT_GUARDED)
    except ImportError as e:     # onnxruntime missing
        return [dict(row, source="—", note=f"skipped: {e}") for row in base]
    return [dict(row, max_abs_logit_diff=r["max_abs_logit_diff"], greedy_agreement=r["greedy_agreement"])
            for row, r in zip(base, rows)]


def model_costs(tiny: bool, tokens: int) -> dict:
    from transformers import GPT2Config
    from llm_psi.engine.loop import TINY_CONFIG
    cfg = GPT2Config(**TINY_CONFIG) if tiny else GPT2Config()
    config = {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "vocab_size")}
    prompt = 7  # tokens of PROMPT
    return dict(roofline.model_costs(config, context=prompt + tokens / 2), config=config)


def summarize(rows: list[dict], roof: dict, costs: dict) -> list[dict]:
    """One row per setting, batch and condition: the median over repeats and its roofline."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in SUMMARY[:5]), []).append(r["tokens_per_cpu_s"])
    out = []
    for key, values in groups.items():
        row = dict(zip(SUMMARY[:5], key), tokens_per_cpu_s=round(statistics.median(values), 3))
        top = roofline.roofline_tokens(row["batch"], row["dtype"], row["quantize"], roof, costs)
        row["roofline_tokens_per_cpu_s"] = round(top, 3) if top else None
        row["roofline_fraction"] = round(row["tokens_per_cpu_s"] / top, 4) if top else None
        out.append(row)
    return out


def _write_csv(path, columns, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def roofline_lines(roof: dict, costs: dict) -> list[str]:
    gb = roof["bandwidth_bytes_per_cpu_s"] / 1e9
    lines = [f"- stream-copy bandwidth BW: {gb:.1f} GB per CPU-second ({roof['stream_bytes'] // 2 ** 20} MiB "
             f"copied, read + write counted)"]
    for d in roofline.BYTES:
        peak = roof[f"peak_{d}_flop_per_cpu_s"]
        lines.append(f"- matmul peak P[{d}]: {_fmt(peak and peak / 1e9)} GFLOP per CPU-second "
                     f"({roof[f'peak_{d}_kernel']}, {'x'.join(map(str, roofline.MATMUL))})")
    p = costs["matmul_params"]
    lines += [f"- matmul parameters {p / 1e6:.1f} M: W = {p * 4 / 1e6:.0f} MB (float32), {p * 2 / 1e6:.0f} MB "
              f"(bfloat16), {p / 1e6:.0f} MB (int8) per decode step; F = {costs['flop_per_token'] / 1e6:.0f} MFLOP "
              f"per token", "",
              "roofline_tokens_per_cpu_s(b) = min(b * BW / W, P[d] / F): weight bytes per step over bandwidth "
              "binds at batch 1, FLOPs over peak at 16 and above. roofline_fraction = measured / roofline."]
    return lines


def comparison(summary: list[dict]) -> list[str]:
    """Per condition and batch: our best setting beside the best peer's."""
    lines = []
    for constrained in (False, True):
        for b in sorted({r["batch"] for r in summary}):
            cell = [r for r in summary if r["batch"] == b and r["constrained"] == constrained]
            mine = [r for r in cell if r["engine"].startswith("ours")]   # ours and ours-ort
            ours = max(mine, key=lambda r: r["tokens_per_cpu_s"], default=None)
            peer = max((r for r in cell if r not in mine), key=lambda r: r["tokens_per_cpu_s"], default=None)
            if ours and peer:
                lines.append(f"- {'quota' if constrained else 'unconstrained'}, batch {b}: ours "
                             f"{ours['tokens_per_cpu_s']:.1f} ({ours['dtype']}/{ours['quantize']}), best peer "
                             f"{peer['engine']} {peer['tokens_per_cpu_s']:.1f} ({peer['dtype']}/{peer['quantize']}): "
                             f"ours at {ours['tokens_per_cpu_s'] / peer['tokens_per_cpu_s']:.2f}x")
    return lines


def markdown(args, summary, skipped, why, roof, costs, guard) -> str:
    cells = {tuple(r[k] for k in SUMMARY[:5]): r for r in summary}
    head = [f"# Engines on one thread: tokens per CPU-second ({'tiny GPT-2' if args.tiny else 'GPT-2 124M'} "
            f"architecture, seeded weights, {args.tokens} new tokens, median of {args.repeats})", "",
            "## Roofline (measured in this run, unconstrained)", "", *roofline_lines(roof, costs), "",
            *(["The tiny config's weights fit in the caches: fractions above 1 are possible.", ""] if args.tiny
              else []),
            "## Tokens per CPU-second", "",
            "| engine | dtype | quantize | batch | unconstrained | fraction | under the quota | fraction | roofline "
            "| bound |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines = []
    for key in dict.fromkeys(k[:4] for k in cells):
        free, quota = cells.get((*key, False)), cells.get((*key, True))
        any_row = free or quota
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {_fmt(free and free['tokens_per_cpu_s'])} | "
                     f"{_fmt(free and free['roofline_fraction'], '.2f')} | "
                     f"{_fmt(quota and quota['tokens_per_cpu_s'])} | "
                     f"{_fmt(quota and quota['roofline_fraction'], '.2f')} | "
                     f"{_fmt(any_row['roofline_tokens_per_cpu_s'])} | "
                     f"{roofline.bound(key[3], key[1], key[2], roof, costs) or '—'} |")
    pairs = comparison(summary) or ["- not measured: needs ours and at least one peer"]
    tail = ["", "## Ours beside the best peer", "", *pairs]
    tail += ["", "## Accuracy guard (ours against float32)", "",
             "| engine | dtype | quantize | steps | largest abs logit diff | greedy tokens equal | source |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for g in guard:
        tail.append(f"| {g['engine']} | {g['dtype']} | {g['quantize']} | {g['steps']} | "
                    f"{_fmt(g['max_abs_logit_diff'], '.4g')} | "
                    f"{_fmt(g['greedy_agreement'], '.0%')} | {g['source']}{' ' + g['note'] if g['note'] else ''} |")
    tail += ["", "Teacher-forced on the float32 greedy continuation. Random weights give near-flat logits; "
                 "judging quality needs real weights (--model)."]
    notes = ([f"- rows under the quota skipped: {why}"] if why else []) + [f"- skipped: {s}" for s in skipped]
    if notes:
        tail += ["", "## Not measured", "", *notes]
    return "\n".join(head + lines + tail + [""])


def figure(path, summary, roof, costs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted({r["batch"] for r in summary})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, constrained in zip(axes, (False, True)):
        for key in dict.fromkeys((r["engine"], r["dtype"], r["quantize"]) for r in summary):
            pts = sorted((r["batch"], r["tokens_per_cpu_s"]) for r in summary
                         if (r["engine"], r["dtype"], r["quantize"]) == key and r["constrained"] == constrained)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{key[0]} {key[1] if key[2] == 'none' else 'int8'}")
        if not any(r["constrained"] == constrained for r in summary):
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center")
        for kind, style in (("float32", ":"), ("bfloat16", "--"), ("int8", "-.")):
            tops = [roofline.roofline_tokens(b, "float32" if kind == "int8" else kind,
                                             "int8" if kind == "int8" else "none", roof, costs) for b in batches]
            if all(tops):
                ax.plot(batches, tops, style, color="grey", label=f"roofline {kind}")
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set(yscale="log", xlabel="batch", title="under the quota" if constrained else "unconstrained")
        ax.set_xticks(batches, [str(b) for b in batches])
    axes[0].set_ylabel("new tokens per CPU-second (1 thread)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(args, rows, skipped, why, roof, guard) -> str:
    """Every output file in args.output_dir; returns the table."""
    costs = model_costs(args.tiny, args.tokens)
    summary = summarize(rows, roof, costs)
    out = args.output_dir
    _write_csv(os.path.join(out, "summary.csv"), SUMMARY, summary)
    _write_csv(os.path.join(out, "runs.csv"), RUNS, rows)
    _write_csv(os.path.join(out, "accuracy.csv"), ACCURACY, guard)
    with open(os.path.join(out, "roofline.json"), "w") as f:
        json.dump(dict(roof, **costs), f, indent=1)
    figure(os.path.join(out, "engines.png"), summary, roof, costs)
    table = markdown(args, summary, skipped, why, roof, costs, guard)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    return table
