"""The co-tenant experiment: the service beside a CPU co-tenant, under the quota and unlimited.

    sudo .venv/bin/python -m bench.cotenant [--results-dir results/cotenant] [--force|--resume] [--load 0.7]
    .venv/bin/python -m bench.cotenant --report-only --results-dir DIR    # table + figure from the files

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
import os
import random
import re
import signal
import sys
import time

from llm_psi import cgroups
from llm_psi import cli
from llm_psi import config as configs
from llm_psi.load import arrivals
from llm_psi.load import cotenant, runner
from llm_psi import REPO
from bench.cotenant_report import CONFIGS, DEFAULT_SLO, StepError, capacity_frame, read_json, report, setting

HERE = REPO  # the repository root: the root scripts, reference/, results/
PROG = "python -m bench.cotenant"
CAPACITY_CONFIG = {"limited": "cgroups", "unlimited": "baseline"}
CONCURRENCY, CAPACITY_REQUESTS, CPU_QUOTA = 4, 12, configs.CPU_QUOTA_PCT


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


def cell_done(csv_path: str) -> bool:
    meta = read_json(csv_path[:-4] + ".json")
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
    done = read_json(ref) if a.resume else None
    if isinstance(done, dict) and done.get("units_per_s") and not done.get("interrupted"):
        say(f"reference: {ref} exists; skipped (--resume)")
    else:
        say(f"reference: {a.antagonist} alone for {a.reference_seconds:g} s -> {ref}")
        rc = call([sys.executable, "-m", "llm_psi.load.cotenant", "--antagonist", a.antagonist,
                   "--seconds", str(a.reference_seconds), "--json", ref])
        if rc != 0 or not (read_json(ref) or {}).get("units_per_s"):
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
