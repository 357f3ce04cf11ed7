"""The co-tenant experiment: the service beside a CPU co-tenant, under the quota and unlimited.

    sudo .venv/bin/python bench_cotenant.py [--results-dir results/cotenant] [--force|--resume] [--load 0.7]
    .venv/bin/python bench_cotenant.py --report-only --results-dir DIR    # table + figure from the files

Steps (each keeps its files; with --resume a finished step or cell is skipped):
 1. reference: the co-tenant alone (cotenant.py) -> DIR/reference.json; its units_per_s is the reference.
 2. capacity: closed loop at saturation (c=4, 12 requests, no spacing) of cgroups under the quota (the limited
    setting) and of baseline (unlimited), each without and with the co-tenant -> DIR/capacity/<config>_<tenant>.csv;
    capacity = ok requests / span (metrics.summarize's throughput_rps).
 3. cells: open-loop Poisson at --load x the capacity of the cell's setting and tenant, for every configuration
    without and with the co-tenant (16 cells), in an order shuffled from --seed -> DIR/<config>_<tenant>.csv.
 4. report: DIR/table.md, DIR/summary.csv and DIR/cotenant.png, from the files alone.
Limited configurations (configs.is_limited) run in `cgroup_lib.py run --cpu-quota 50`, so they need root; unlimited
ones in a cgroup of their own (`--unlimited`) as root, else directly. The generator starts the co-tenant after its
warm-up, in a sibling cgroup, and stops it. Ctrl-C (or SIGTERM) stops the running cell: exit 130, finished cells
kept. Without --force or --resume, a results dir holding an earlier run's files is refused (exit 2).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import re
import signal
import sys
import time

from llm_psi.load import arrivals
from llm_psi import cgroups
from llm_psi import cli
from llm_psi import config as configs
from llm_psi.load import cotenant, runner
from llm_psi.analysis import metrics
from llm_psi import REPO

HERE = REPO  # the repository root: the root scripts, reference/, results/
PROG = "bench_cotenant.py"
CONFIGS = ("cgroups", "cgroups_threads", "psi", "psi_cgroup", "adaptive", "batch_psi", "baseline", "psi_unlimited")
CAPACITY_CONFIG = {"limited": "cgroups", "unlimited": "baseline"}
ADAPTIVE = ("adaptive", "batch_psi")     # configurations whose admission limit moves
THRESHOLD = 95.0                         # the paper's gate threshold (some avg10, percent)
CONCURRENCY, CAPACITY_REQUESTS, CPU_QUOTA = 4, 12, configs.CPU_QUOTA_PCT
DEFAULT_SLO = "ttft:5000,e2e:15000"


class StepError(Exception):
    """A step failed: a child's exit status, or a file it should have written."""


def setting(config: str) -> str:
    return "limited" if configs.is_limited(config) else "unlimited"


def tenant_label(spec) -> str:
    """'none' without a co-tenant; the spec's letters and digits otherwise ('cpu:2' -> 'cpu2')."""
    return "none" if not spec else (re.sub(r"[^A-Za-z0-9]", "", spec) or "cotenant")


def capacity_cells(config_list, antagonist) -> list[dict]:
    """The saturating closed-loop cells the settings of config_list need, without and with the co-tenant."""
    settings = [s for s in ("limited", "unlimited") if any(setting(c) == s for c in config_list)]
    return [dict(config=CAPACITY_CONFIG[s], setting=s, antagonist=t, tenant=tenant_label(t))
            for s in settings for t in (None, antagonist)]


def plan(config_list, antagonist, capacity: dict, load: float, seed: int) -> list[dict]:
    """The open-loop cells in run order: every (config, tenant) pair once, shuffled with random.Random(seed);
    rate = load x capacity[(setting of the config, tenant label)], rounded to 4 decimals."""
    cells = [dict(config=c, setting=setting(c), antagonist=t, tenant=tenant_label(t))
             for c in config_list for t in (None, antagonist)]
    random.Random(seed).shuffle(cells)
    for cell in cells:
        cell["rate"] = round(load * capacity[(cell["setting"], cell["tenant"])], 4)
    return cells


def wrap(config: str, meta: str, cmd: list, root: bool) -> list:
    """cmd inside the service cgroup: limited under the quota; unlimited in a cgroup of its own when root."""
    return runner.wrap(cmd, config, meta=meta, quota=CPU_QUOTA, root=root)


def generator_cmd(a, cell: dict, out: str) -> list:
    """The request generator's command line for a capacity cell (no 'rate') or an open-loop cell."""
    cmd = [sys.executable, os.path.join(HERE, "request_generator.py"), "--config", cell["config"],
           "--concurrency", str(CONCURRENCY), "--seed", str(a.seed), "--max-new-tokens", str(a.max_new_tokens),
           "--output", out, "--quiet", "--resume" if a.resume else "--force"]
    if "rate" in cell:
        cmd += ["--arrival", "poisson", "--rate", str(cell["rate"]), "--num-requests", str(a.num_requests),
                "--slo", a.slo]
    else:
        cmd += ["--num-requests", str(CAPACITY_REQUESTS), "--spacing-ms", "0"]
    return cmd + (["--antagonist", cell["antagonist"]] if cell["antagonist"] else []) + ["--tiny"] * a.tiny


def call(cmd: list) -> int:
    """Run cmd in its own process group, dying with this process; a Ctrl-C here reaches it once (forwarded),
    and raises KeyboardInterrupt after it has stopped. A child stopped by a signal raises it too."""
    proc = cgroups.spawn([], cmd, process_group=0)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        raise
    if rc in (130, -signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGTERM):
        raise KeyboardInterrupt
    return rc


def _json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cell_done(csv_path: str) -> bool:
    meta = _json(csv_path[:-4] + ".json")
    return isinstance(meta, dict) and meta.get("complete") is True


def existing_results(d: str) -> list[str]:
    """The files of an earlier run in d: reference.json, cells, capacity cells."""
    found = glob.glob(os.path.join(d, "reference.json")) + glob.glob(os.path.join(d, "*.csv"))
    return sorted(found + glob.glob(os.path.join(d, "capacity", "*.csv")))


def read_capacity(d: str) -> dict:
    """{(setting, tenant label): ok requests per second} from the capacity cells in d/capacity."""
    cap = capacity_frame(d)
    return {} if cap.empty else {(r.setting, tenant_label(None if r.cotenant == "none" else r.cotenant)):
                                 r.capacity_rps for r in cap.itertuples()}


def run_all(a, root: bool) -> list[str]:
    """Steps 1-3; returns the cells that failed (the run goes on past them)."""
    t0 = time.monotonic()

    def say(msg):
        print(f"[{(time.monotonic() - t0) / 60:5.1f} min] {msg}", file=sys.stderr, flush=True)

    def run_cell(label, cell, out) -> bool:
        if a.resume and cell_done(out):
            say(f"{label}: {out} finished; skipped (--resume)")
            return True
        load = f"{cell['rate']:g} req/s" if "rate" in cell else "closed loop, saturating"
        say(f"{label}: {cell['config']}, co-tenant {cell['antagonist'] or 'none'}, {load} -> {out}")
        return call(wrap(cell["config"], out[:-4] + ".json", generator_cmd(a, cell, out), root)) == 0
    ref = os.path.join(a.results_dir, "reference.json")
    os.makedirs(os.path.join(a.results_dir, "capacity"), exist_ok=True)
    done = _json(ref) if a.resume else None
    if isinstance(done, dict) and done.get("units_per_s") and not done.get("interrupted"):
        say(f"reference: {ref} exists; skipped (--resume)")
    else:
        say(f"reference: {a.antagonist} alone for {a.reference_seconds:g} s -> {ref}")
        rc = call([sys.executable, "-m", "llm_psi.load.cotenant", "--antagonist", a.antagonist,
                   "--seconds", str(a.reference_seconds), "--json", ref])
        if rc != 0 or not (_json(ref) or {}).get("units_per_s"):
            raise StepError(f"the reference run failed or measured no throughput ({ref})")
    caps = capacity_cells(a.configs, a.antagonist)
    for i, cell in enumerate(caps, 1):
        out = os.path.join(a.results_dir, "capacity", f"{cell['config']}_{cell['tenant']}.csv")
        if not run_cell(f"capacity {i}/{len(caps)} ({cell['setting']})", cell, out):
            raise StepError(f"capacity cell {out} failed")
    capacity = read_capacity(a.results_dir)
    for key in {(c["setting"], c["tenant"]) for c in caps}:
        if not capacity.get(key, 0) > 0:
            raise StepError(f"no capacity measured for {key[0]} with co-tenant {key[1]}")
    cells, failed = plan(a.configs, a.antagonist, capacity, a.load, a.seed), []
    for i, cell in enumerate(cells, 1):
        out = os.path.join(a.results_dir, f"{cell['config']}_{cell['tenant']}.csv")
        if not run_cell(f"cell {i}/{len(cells)}", cell, out):
            failed.append(out)
            say(f"cell {i}/{len(cells)}: {out} FAILED; going on")
    say(f"done: {len(cells) - len(failed)} of {len(cells)} cells")
    return failed


# ---- the report: pure functions over the files' contents ----

def crossing(timeline, column: str, threshold: float = THRESHOLD) -> tuple[float, float]:
    """(share of the timeline samples with a value in which column > threshold, first t_s where it is);
    (NaN, NaN) without samples, (0.0, NaN) where it never crosses."""
    import pandas as pd
    if timeline is None or column not in timeline or "t_s" not in timeline:
        return math.nan, math.nan
    v, t = pd.to_numeric(timeline[column], errors="coerce"), pd.to_numeric(timeline["t_s"], errors="coerce")
    if not v.notna().any():
        return math.nan, math.nan
    over = v > threshold
    return float(over.sum() / v.notna().sum()), float(t[over].min()) if over.any() else math.nan


def deferred(df) -> int:
    """Requests the gate held: more than one check, or admitted after the last check."""
    import pandas as pd
    checks = pd.to_numeric(df.get("gate_checks", pd.Series(dtype=float)), errors="coerce")
    decision = df.get("gate_decision", pd.Series(dtype=str)).astype(str)
    return int(metrics.deferred(checks, decision).sum())


def cotenant_share(meta: dict, reference) -> float:
    """The co-tenant's mean units/s over the cell's trials / its units/s alone; NaN without a co-tenant, without
    a reference, or where the reference ran another co-tenant spec."""
    spec = (meta.get("config") or {}).get("antagonist")
    rates = [t["cotenant"]["mean_units_per_s"] for t in meta.get("trials", [])
             if (t.get("cotenant") or {}).get("mean_units_per_s") is not None]
    ref = (reference or {}).get("units_per_s")
    if not spec or not rates or not ref or (reference or {}).get("antagonist") != spec:
        return math.nan
    return sum(rates) / len(rates) / ref


def cell_row(df, meta: dict, timeline, reference, slo: dict) -> dict:
    """One row of summary.csv from a cell's rows, metadata and timeline."""
    import pandas as pd
    cfg = meta.get("config") or {}
    s = metrics.summarize(df, slo)
    row = dict(config=cfg.get("config"), limited="yes" if configs.is_limited(cfg.get("config", "")) else "no",
               cotenant=cfg.get("antagonist") or "none", rate_rps=cfg.get("rate"), n_ok=s["n_ok"],
               n_rejected=s["n_rejected"], p95_e2e_s=s["p95_e2e_ms"] / 1000, p95_service_s=s["p95_service_ms"] / 1000,
               goodput_rps=s["goodput_rps"], cotenant_share=cotenant_share(meta, reference), deferred=deferred(df),
               complete=bool(meta.get("complete")))
    row["sys_over_frac"], row["sys_first_cross_s"] = crossing(timeline, "sys_cpu_some_avg10")
    row["cg_over_frac"], row["cg_first_cross_s"] = crossing(timeline, "cg_cpu_some_avg10")
    limit = (pd.to_numeric(timeline["limit"], errors="coerce") if timeline is not None and "limit" in timeline
             and row["config"] in ADAPTIVE else pd.Series(dtype=float))
    row["limit_min"], row["limit_max"] = (float(limit.min()), float(limit.max())) if limit.notna().any() else (
        math.nan, math.nan)
    return row


def _order(frame, key="config"):
    rank = {c: i for i, c in enumerate(CONFIGS)}
    return frame.assign(_r=frame[key].map(lambda c: rank.get(c, len(rank))), _t=frame["cotenant"] != "none") \
        .sort_values(["_r", key, "_t", "cotenant"]).drop(columns=["_r", "_t"]).reset_index(drop=True)


def cells_in(d: str) -> list[tuple[str, dict]]:
    """(stem, metadata) of every cell in d: a JSON with a 'config' object and a CSV beside it."""
    found = [(path[:-5], _json(path)) for path in sorted(glob.glob(os.path.join(d, "*.json")))]
    return [(stem, meta) for stem, meta in found if isinstance(meta, dict) and isinstance(meta.get("config"), dict)
            and os.path.exists(stem + ".csv")]


def summary_frame(d: str, slo: dict):
    """summary.csv: one row per cell in d."""
    import pandas as pd
    reference, rows = _json(os.path.join(d, "reference.json")), []
    for stem, meta in cells_in(d):
        tl = pd.read_csv(stem + "_timeline.csv") if os.path.exists(stem + "_timeline.csv") else None
        rows.append(cell_row(pd.read_csv(stem + ".csv"), meta, tl, reference, slo))
    return _order(pd.DataFrame(rows)) if rows else pd.DataFrame()


def capacity_frame(d: str):
    """The capacity cells in d/capacity: setting, config, co-tenant, capacity (ok requests / span), p95 service."""
    import pandas as pd
    rows = []
    for stem, meta in cells_in(os.path.join(d, "capacity")):
        s, cfg = metrics.summarize(pd.read_csv(stem + ".csv")), meta["config"]
        rows.append(dict(setting=setting(cfg["config"]), config=cfg["config"], cotenant=cfg.get("antagonist") or "none",
                         capacity_rps=s["throughput_rps"], n_ok=s["n_ok"], p95_service_s=s["p95_service_ms"] / 1000))
    return _order(pd.DataFrame(rows)) if rows else pd.DataFrame()


def e2e_panel(summary):
    """p95 e2e (s): configs (in CONFIGS order) x co-tenant ('none' first)."""
    p = summary.pivot_table(index="config", columns="cotenant", values="p95_e2e_s", aggfunc="first")
    cols = sorted(p.columns, key=lambda c: (c != "none", c))
    return p.reindex(index=list(dict.fromkeys(summary["config"])), columns=cols)


def share_panel(summary):
    """The co-tenant's share of its throughput alone, per config (cells with a co-tenant only)."""
    s = summary[summary["cotenant"] != "none"]
    return s.groupby("config", sort=False)["cotenant_share"].first()


def figure(summary, path: str) -> None:
    from matplotlib.figure import Figure
    e2e, share = e2e_panel(summary), share_panel(summary)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    width, x = 0.8 / max(1, len(e2e.columns)), range(len(e2e))
    for j, tenant in enumerate(e2e.columns):
        ax1.bar([i + j * width for i in x], e2e[tenant].to_numpy(float), width, label=f"co-tenant {tenant}")
    ax1.set_xticks([i + width * (len(e2e.columns) - 1) / 2 for i in x], e2e.index, rotation=30, ha="right")
    ax1.set_ylabel("p95 end-to-end (s)")
    ax1.set_title("service: p95 end-to-end")
    ax1.legend()
    ax2.bar(range(len(share)), share.to_numpy(float), 0.6, color="tab:red")
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax2.set_xticks(range(len(share)), share.index, rotation=30, ha="right")
    ax2.set_ylabel("co-tenant throughput / alone")
    ax2.set_title("co-tenant: share of its throughput alone")
    fig.savefig(path, dpi=120)


def _f(v, digits=2, pct=False):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{100 * v:.0f}%" if pct else f"{v:.{digits}f}"


def table_md(summary, capacity, reference, slo_text: str) -> str:
    ref = (reference or {}).get("units_per_s")
    lines = ["# Co-tenant experiment", "",
             f"Co-tenant alone (reference.json): {reference.get('antagonist')}, {_f(ref, 1)} units/s over "
             f"{_f(reference.get('elapsed_s'), 1)} s." if reference else "No reference.json: no co-tenant shares.",
             "", "## Capacity (closed loop, c=4, 12 requests, no spacing): ok requests / span", "",
             "| setting | config | co-tenant | capacity (req/s) | n ok | p95 service (s) |",
             "|---|---|---|---:|---:|---:|"]
    for _, r in capacity.iterrows():
        lines.append(f"| {r.setting} | {r.config} | {r.cotenant} | {_f(r.capacity_rps, 3)} | {r.n_ok} | "
                     f"{_f(r.p95_service_s)} |")
    lines += ["", "## Cells (open-loop Poisson)", "",
              "- rate: the cell's --rate, load x the capacity of its setting with the same co-tenant",
              "- n ok, rejected: requests by status; p95 e2e / p95 service: numpy linear p95 over the ok requests of "
              "t_end - t_submit / t_end - t_start",
              f"- goodput: ok requests meeting the SLO {slo_text} (every bound, ms) / span (first submit to last end)",
              "- co-tenant share: its mean units/s during the trial (trials[].cotenant.mean_units_per_s) / "
              "units/s alone (reference.json); — without a co-tenant or a sample of it (a trial under 1 s)",
              f"- sys > {THRESHOLD:g}: share of timeline samples (every 250 ms) with /proc/pressure/cpu some avg10 > "
              f"{THRESHOLD:g} (the paper's gate threshold), and the first t (s from the trial start) it was; cg > "
              f"{THRESHOLD:g}: the same for the service cgroup's cpu.pressure (cg_cpu_some_avg10); "
              "— never, or no samples",
              "- deferred: requests with gate_checks > 1 or gate_decision admitted_after_timeout",
              "- limit: min–max of the admission limit in the timeline (adaptive, batch_psi)",
              "- *: the cell's JSON does not say complete", "",
              f"| config | limited | co-tenant | rate (req/s) | n ok | rejected | p95 e2e (s) | p95 service (s) | "
              f"goodput (req/s) | co-tenant share | sys > {THRESHOLD:g} | first (s) | cg > {THRESHOLD:g} | first (s) | "
              f"deferred | limit |", "|---|---|---|" + "---:|" * 13]
    for _, r in summary.iterrows():
        limit = "—" if not math.isfinite(r.limit_min) else f"{r.limit_min:.0f}–{r.limit_max:.0f}"
        lines.append(
            f"| {r.config}{'' if r.complete else '*'} | {r.limited} | {r.cotenant} | {_f(r.rate_rps, 3)} | {r.n_ok} | "
            f"{r.n_rejected} | {_f(r.p95_e2e_s)} | {_f(r.p95_service_s)} | {_f(r.goodput_rps, 3)} | "
            f"{_f(r.cotenant_share, pct=True)} | {_f(r.sys_over_frac, pct=True)} | {_f(r.sys_first_cross_s, 1)} | "
            f"{_f(r.cg_over_frac, pct=True)} | {_f(r.cg_first_cross_s, 1)} | {r.deferred} | {limit} |")
    return "\n".join(lines) + "\n"


def report(d: str, slo_text=None) -> str:
    """Write d/table.md, d/summary.csv and d/cotenant.png from the files in d; return the table. Goodput is
    under slo_text; None: the SLO the cells ran with where they agree, else DEFAULT_SLO."""
    ran = {meta["config"].get("slo") for _, meta in cells_in(d)} - {None}
    slo_text = slo_text or (ran.pop() if len(ran) == 1 else DEFAULT_SLO)
    summary, capacity = summary_frame(d, arrivals.parse_slo(slo_text)), capacity_frame(d)
    if summary.empty:
        raise StepError(f"no cells in {d}")
    text = table_md(summary, capacity, _json(os.path.join(d, "reference.json")), slo_text)
    with open(os.path.join(d, "table.md"), "w") as f:
        f.write(text)
    summary.to_csv(os.path.join(d, "summary.csv"), index=False)
    figure(summary, os.path.join(d, "cotenant.png"))
    return text


def _config_list(text):
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"choose from {','.join(CONFIGS)}, got {text!r}")
    return list(dict.fromkeys(names))


def parse_args(argv):
    p = cli.OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    num = cli.finite_number
    p.add_argument("--results-dir", default=os.path.join("results", "cotenant"), help="where every file goes")
    p.add_argument("--report-only", action="store_true", help="table and figure from existing files; run nothing")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="rerun every step, replacing its files")
    g.add_argument("--resume", action="store_true", help="skip finished steps and cells, complete the others")
    p.add_argument("--num-requests", type=num(int, ge=1), default=20, help="requests per open-loop cell")
    p.add_argument("--load", type=num(gt=0), default=0.7, help="open-loop rate as a fraction of capacity")
    p.add_argument("--seed", type=num(int, ge=0), default=0, help="run order, arrivals, weights and sampling")
    p.add_argument("--slo", type=cli.checked_by(arrivals.parse_slo), help=f"goodput SLO, metric:ms pairs (default: "
                   f"{DEFAULT_SLO}; with --report-only the SLO the cells ran with)", default=argparse.SUPPRESS)
    p.add_argument("--antagonist", type=cli.checked_by(cotenant.parse_spec), default="cpu:2",
                   help="the co-tenant: cpu:N burners or a shell command")
    p.add_argument("--max-new-tokens", type=num(int, ge=1), default=50, help="tokens per request")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    p.add_argument("--reference-seconds", type=num(gt=0), default=30.0, help="advanced: the co-tenant's run alone")
    p.add_argument("--configs", type=_config_list, default=",".join(CONFIGS),
                   help="advanced: comma-separated subset of the configurations")
    a = p.parse_args(argv)
    a.slo_given = getattr(a, "slo", None)     # --report-only without --slo: the cells' own
    a.slo = a.slo_given or DEFAULT_SLO
    return a


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not a.report_only:
            root = os.geteuid() == 0
            if not root and any(configs.is_limited(c) for c in a.configs):
                print(f"{PROG}: error: must run as root (sudo): the limited cells run under a CPU quota in a cgroup "
                      f"(--report-only needs no root)", file=sys.stderr)
                return 2
            found = existing_results(a.results_dir)
            if found and not (a.force or a.resume):
                print(f"{PROG}: error: {a.results_dir} holds results ({found[0]}, {len(found)} in all); --resume "
                      f"completes them, --force replaces them", file=sys.stderr)
                return 2
            for s in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, cotenant._interrupt)
            failed = run_all(a, root)
        else:
            failed = []
        print(report(a.results_dir, a.slo_given or (None if a.report_only else a.slo)), end="")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished cells are kept in {a.results_dir}", file=sys.stderr)
        return 130
    except StepError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if a.report_only else 1
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if failed:
        print(f"{PROG}: error: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
