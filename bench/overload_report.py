"""The overload benchmark's report (bench/overload.py), from the files of its folder alone:

    plan.json                 phases, settings, trials, the run order, the knobs and the SLO
    capacity.csv              the capacity run's requests (closed loop): capacity and mean service time
    trials/<setting>_t<k>.csv every request of one trial; .json: the trial's cell (commit, counts, complete)

It writes trials.csv (one row per trial and phase), summary.csv (per setting and phase, the mean over trials
with a 95% t-interval of the goodput and p99 TTFT), summary.md and overload.png. ``python -m bench.overload
--report-only`` calls it, and the run ends with it, so the summary is rewritten byte for byte from the files.

Phases: each request belongs to the phase it was sent in; each completion is counted in the phase whose
window holds its end, and a last ``drain`` phase (no arrivals, from the end of the schedule to the last
completion) holds those that end after it, so every completion is counted exactly once.
"""
from __future__ import annotations

import csv
import json
import math
import os

from llm_psi.analysis import metrics, stats

DRAIN = "drain"
REQUESTS = ["setting", "trial", "phase", "t_send_s", "status", "decision", "ttft_s", "e2e_s", "t_end_s", "error"]
CAPACITY = ["client", "index", "t_send_s", "t_end_s", "status", "service_s"]
TRIALS = ["setting", "trial", "phase", "multiple", "duration_s", "offered_rps", "sent", "ok", "refused", "failed",
          "completed", "good", "throughput_ratio", "goodput_ratio", "p50_ttft_s", "p99_ttft_s"]
SUMMARY = ["setting", "phase", "multiple", "n_trials", "sent", "refused", "completed", "good",
           "offered_ratio", "goodput_ratio", "goodput_lo", "goodput_hi", "throughput_ratio",
           "p99_ttft_s", "p99_ttft_lo", "p99_ttft_hi", "slo_ttft_s", "capacity_rps", "service_s"]
OUTPUTS = ("trials.csv", "summary.csv", "summary.md", "overload.png")


def _num(v):
    """A CSV field as a float, None where empty."""
    return None if v in (None, "") else float(v)


def read_requests(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["trial"], r["phase"] = int(r["trial"]), int(r["phase"])
        for k in ("t_send_s", "ttft_s", "e2e_s", "t_end_s"):
            r[k] = _num(r[k])
    return rows


def capacity_of(path: str) -> tuple[float, float]:
    """(requests done per second from the start to the last completion, mean service time s) of capacity.csv."""
    with open(path, newline="") as f:
        ok = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    if len(ok) < 2:
        raise ValueError(f"{path}: only {len(ok)} requests finished; the capacity cannot be computed")
    return len(ok) / max(float(r["t_end_s"]) for r in ok), sum(float(r["service_s"]) for r in ok) / len(ok)


def windows(phases) -> list[tuple[object, float, float]]:
    """[(phase, start s, end s)] of the schedule, then the drain phase from its end to infinity."""
    out, start = [], 0.0
    for k, (_, d) in enumerate(phases):
        out.append((k, start, start + d))
        start += d
    return out + [(DRAIN, start, math.inf)]


def phase_rows(rows, phases, capacity: float, slo_s: float) -> list[dict]:
    """One row per phase of one trial (TRIALS, without setting and trial): offered and sent by send time,
    completions and goodput by completion time within the phase's window (the drain's lasts from the end of
    the schedule to the last completion), TTFT of the admitted requests sent in the phase."""
    out = []
    ends = [r["t_end_s"] for r in rows if r["status"] == "ok"]
    for k, start, end in windows(phases):
        sent = [r for r in rows if r["phase"] == k]
        done = [r for r in rows if r["status"] == "ok" and start <= r["t_end_s"] < end]
        good = [r for r in done if r["ttft_s"] <= slo_s]
        ttft = [r["ttft_s"] for r in sent if r["status"] == "ok"]
        d = phases[k][1] if k != DRAIN else max([start] + ends) - start
        # the drain has no offered load: its completions are counted, not turned into a rate
        ratio = (lambda n: round(n / d / capacity, 3)) if d > 0 and k != DRAIN else (lambda n: math.nan)
        out.append({"phase": k, "multiple": phases[k][0] if k != DRAIN else 0.0, "duration_s": round(d, 3),
                    "offered_rps": round(len(sent) / d, 4) if d > 0 else 0.0, "sent": len(sent),
                    "ok": len(ttft), "refused": sum(r["status"] == "rejected" for r in sent),
                    "failed": sum(r["status"] == "failed" for r in sent), "completed": len(done), "good": len(good),
                    "throughput_ratio": ratio(len(done)), "goodput_ratio": ratio(len(good)),
                    "p50_ttft_s": round(metrics.percentile(ttft, 50), 3),
                    "p99_ttft_s": round(metrics.percentile(ttft, 99), 3)})
    return out


def _interval(values) -> tuple[float, float, float]:
    mean, lo, hi = stats.t_interval(values)
    return tuple(round(v, 3) if math.isfinite(v) else math.nan for v in (mean, lo, hi))


def summarize(per_trial: list[dict], plan: dict, capacity: float, service_s: float) -> list[dict]:
    """One row per setting and phase: sums of the counts, and the mean over trials with a 95% t-interval of
    the goodput and p99 TTFT."""
    out = []
    for setting in plan["settings"]:
        mine = [r for r in per_trial if r["setting"] == setting]
        for k in [p for p, _, _ in windows(plan["phases"])]:
            rows = [r for r in mine if r["phase"] == k]
            if not rows:
                continue
            good, glo, ghi = _interval([r["goodput_ratio"] for r in rows])
            p99, plo, phi = _interval([r["p99_ttft_s"] for r in rows])
            sent = sum(r["sent"] for r in rows)
            duration = sum(r["duration_s"] for r in rows)
            out.append({"setting": setting, "phase": k, "multiple": rows[0]["multiple"], "n_trials": len(rows),
                        "sent": sent, "refused": sum(r["refused"] for r in rows),
                        "completed": sum(r["completed"] for r in rows), "good": sum(r["good"] for r in rows),
                        "offered_ratio": round(sent / duration / capacity, 3) if duration > 0 and k != DRAIN
                        else math.nan,
                        "goodput_ratio": good, "goodput_lo": glo, "goodput_hi": ghi,
                        "throughput_ratio": _interval([r["throughput_ratio"] for r in rows])[0],
                        "p99_ttft_s": p99, "p99_ttft_lo": plo, "p99_ttft_hi": phi,
                        "slo_ttft_s": round(plan["slo_ttft_s"], 3), "capacity_rps": round(capacity, 4),
                        "service_s": round(service_s, 4)})
    return out


def write_csv(path, columns, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _ci(mean, lo, hi, fmt="{:.2f}") -> str:
    if not math.isfinite(mean):
        return "—"
    return fmt.format(mean) + (f" [{fmt.format(lo)}–{fmt.format(hi)}]" if math.isfinite(lo) else "")


def markdown(summary: list[dict], plan: dict) -> str:
    first = summary[0]
    lines = [f"Capacity {first['capacity_rps']} req/s (mean service {first['service_s']} s, `capacity.csv`); "
             f"T = {plan['max_queue_delay_ms']} ms, max waiting {plan['max_waiting']}; SLO TTFT <= "
             f"{first['slo_ttft_s']} s. {plan['trials']} trials per setting, interleaved (`plan.json`). Ratios "
             "are to the capacity, the mean over trials with a 95% t-interval; TTFT of the admitted requests. "
             "Sent, refused and completed are sums over trials; completions count in the phase where they end, "
             "the drain phase holds those after the schedule.", "",
             "| setting | phase | aimed | offered | sent | refused | completed | within SLO | goodput | p99 TTFT s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        aimed = "—" if r["phase"] == DRAIN else f"{r['multiple']}x"
        offered = "—" if r["phase"] == DRAIN else f"{r['offered_ratio']:.2f}x"
        lines.append(f"| {r['setting']} | {r['phase']} | {aimed} | {offered} | {r['sent']} | {r['refused']} | "
                     f"{r['completed']} | {r['good']} | {_ci(r['goodput_ratio'], r['goodput_lo'], r['goodput_hi'])} | "
                     f"{_ci(r['p99_ttft_s'], r['p99_ttft_lo'], r['p99_ttft_hi'])} |")
    return "\n".join(lines) + "\n"


def load(out_dir: str):
    """(plan, capacity, service_s, {(setting, trial): rows}) from the folder's files; the trials the plan's run
    order names must all be there and complete."""
    with open(os.path.join(out_dir, "plan.json")) as f:
        plan = json.load(f)
    plan["phases"] = [tuple(p) for p in plan["phases"]]
    capacity, service_s = capacity_of(os.path.join(out_dir, "capacity.csv"))
    trials = {}
    for setting, k in plan["order"]:
        stem = os.path.join(out_dir, "trials", f"{setting}_t{k}")
        with open(stem + ".json") as f:
            if not json.load(f).get("complete"):
                raise ValueError(f"{stem}.json: the trial is not complete")
        trials[(setting, k)] = read_requests(stem + ".csv")
    return plan, capacity, service_s, trials


def report(out_dir: str) -> str:
    """Write trials.csv, summary.csv, summary.md and overload.png from the folder's files; return summary.md."""
    plan, capacity, service_s, trials = load(out_dir)
    per_trial = []
    for setting in plan["settings"]:
        for k in range(1, plan["trials"] + 1):
            if (setting, k) in trials:
                per_trial += [{"setting": setting, "trial": k, **r}
                              for r in phase_rows(trials[(setting, k)], plan["phases"], capacity, plan["slo_ttft_s"])]
    summary = summarize(per_trial, plan, capacity, service_s)
    write_csv(os.path.join(out_dir, "trials.csv"), TRIALS, per_trial)
    write_csv(os.path.join(out_dir, "summary.csv"), SUMMARY, summary)
    text = markdown(summary, plan)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    figure(os.path.join(out_dir, "overload.png"), summary, trials, plan)
    return text


def figure(path, summary, trials, plan) -> None:
    """Left: TTFT of the admitted requests of every trial against the intended send time; right: the goodput
    with its interval in the phase of the highest load, per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    phases, settings = plan["phases"], plan["settings"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, s in enumerate(settings):
        ok = [r for (setting, _), rows in sorted(trials.items()) if setting == s for r in rows if r["status"] == "ok"]
        ax.scatter([r["t_send_s"] for r in ok], [r["ttft_s"] for r in ok], s=6, label=s, color=f"C{i}")
    edge = 0.0
    for m, d in phases:
        ax.axvspan(edge, edge + d, alpha=0.08 if m <= 1 else 0.2, color="grey")
        ax.text(edge + d / 2, 1.0, f"{m}x", transform=ax.get_xaxis_transform(), ha="center", va="bottom")
        edge += d
    ax.axhline(plan["slo_ttft_s"], ls="--", color="k", lw=0.8, label="SLO")
    ax.set(xlabel="intended send time (s)", ylabel="TTFT of admitted requests (s)", yscale="log")
    ax.legend(fontsize=8)
    worst = max(range(len(phases)), key=lambda k: phases[k][0])
    rows = [next(r for r in summary if r["setting"] == s and r["phase"] == worst) for s in settings]
    x = list(range(len(rows)))
    err = [[max(0.0, r["goodput_ratio"] - r["goodput_lo"]) if math.isfinite(r["goodput_lo"]) else 0 for r in rows],
           [max(0.0, r["goodput_hi"] - r["goodput_ratio"]) if math.isfinite(r["goodput_hi"]) else 0 for r in rows]]
    bx.bar(x, [r["goodput_ratio"] for r in rows], 0.5, yerr=err, capsize=4, label="goodput / capacity [95%]")
    bx.axhline(0.9, ls="--", color="k", lw=0.8)
    bx.set(xticks=x, xticklabels=settings, title=f"phase {worst} (aimed at {phases[worst][0]}x capacity)")
    for i, r in enumerate(rows):
        bx.text(i, 0.02, f"p99 TTFT {_ci(r['p99_ttft_s'], r['p99_ttft_lo'], r['p99_ttft_hi'])} s", ha="center",
                fontsize=7, rotation=90, va="bottom")
    bx.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
