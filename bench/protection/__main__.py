"""Protection (issue 32): can a resident LLM share a host without hurting its owner?

    sudo .venv/bin/python -m bench.protection --pilot                  # calibration, pilot, power -> plan.json
    sudo .venv/bin/python -m bench.protection [--resume]               # the grid, trials from plan.json
    .venv/bin/python -m bench.protection --report-only [--results-dir DIR]

Every file goes under --results-dir (results/protection). The owner (an interactive program at a fixed rate, or
batch burners) runs in the co-tenant's cgroup; the LLM service (llm_server.py serve) in the service cgroup with
the configuration's controls; the load generator outside both, over HTTP. Steps:
 0. calibration (once, into plan.json): the paper's quota's capacity alone (cgroups, closed loop at
    --saturate-concurrency): the interactive load is --llm-fraction of it, and its tokens/s the LLM's promise.
 1. --pilot: --pilot-trials of the pilot's cells into DIR/pilot/; each metric's per-trial SD pooled over cells
    and the trials per configuration that resolve 5 points of isol% and 10 points of p99 lat-imp% (80% power,
    two-sided 5%) into plan.json.
 2. the grid: configs x owners x loads x trials (plan.json's, or --trials), interleaved in rounds drawn from
    --seed; each trial a cell JSON (commit, dirty state, complete). --resume skips the complete ones (from the
    commit plan.json names), --stop-after-min ends a part cleanly, --loads/--owners/--configs pick a part.
 3. report: DIR/summary.csv, DIR/power.csv and DIR/differences.csv (bench/protection/report.py); --report-only
    rewrites them.
Ctrl-C or SIGTERM stops the running trial (exit 130); complete trials are kept.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys

from llm_psi import cli
from llm_psi import config as configs
from llm_psi.load import arrivals, cotenant
from llm_psi.load import owner as owners
from llm_psi.load.environment import code_state
from bench.protection import report as rep
from bench.protection import run as runs

PROG = "python -m bench.protection"
ENGINE_ARGS = ("--engine ort --dtype float32 --quantize int8 --batching dynamic --torch-threads auto "
               "--omp-wait-policy auto --engine-thread caller")
PILOT = dict(configs="baseline,cgroups,weight1,idle,headroom", owners="interactive,batch", loads="saturated")


def _names(allowed):
    def parse(text):
        names = [c.strip() for c in text.split(",") if c.strip()]
        bad = [c for c in names if c not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"unknown {','.join(bad) or repr(text)} (choose from {', '.join(allowed)})")
        return list(dict.fromkeys(names))
    return parse


def parse_args(argv):
    p = cli.OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    num = cli.finite_number
    g = p.add_argument_group("run")
    g.add_argument("--results-dir", default=os.path.join("results", "protection"), help="where every file goes")
    g.add_argument("--force", action="store_true", help="replace the trials of an earlier run")
    g.add_argument("--resume", action="store_true", help="keep the complete trials and run the others")
    g.add_argument("--report-only", action="store_true", help="summary.csv, power.csv and differences.csv from the files; run nothing")
    g.add_argument("--pilot", action="store_true", help=f"the pilot ({PILOT['configs']}; owners {PILOT['owners']}; "
                                                         f"load {PILOT['loads']}; unless given) and the power plan")
    g.add_argument("--pilot-trials", type=num(int, ge=2), default=3, help="trials per pilot cell")
    g.add_argument("--configs", type=_names(rep.CONFIGS), default=None, help="comma-separated (default: all)")
    g.add_argument("--owners", type=_names(rep.OWNERS), default=None, help="comma-separated (default: both)")
    g.add_argument("--loads", type=_names(rep.LOADS), default=None, help="LLM loads, comma-separated (default: all)")
    g.add_argument("--trials", type=num(int, ge=1), default=None, help="trials per cell (default: plan.json's)")
    g.add_argument("--seed", type=num(int, ge=0), default=0, help="the interleaved order and the arrivals")
    g.add_argument("--stop-after-min", type=num(gt=0), default=None,
                   help="start no trial after this many minutes (a part; continue with --resume)")
    g.add_argument("--quick", action="store_true", help="smoke run: phases 4 s and 6 s, 4 tokens (explicit options win)")
    g = p.add_argument_group("owner")
    g.add_argument("--interactive", type=cli.checked_by(owners.parse), default=owners.DEFAULT,
                   help="the interactive owner, interactive:RATE:COST_MS")
    g.add_argument("--batch", type=cli.checked_by(owners.parse), default="batch:2", help="the batch owner, batch:N")
    g.add_argument("--alone-s", type=num(ge=1), default=20.0, help="the owner alone, per trial")
    g.add_argument("--with-s", type=num(ge=1), default=30.0, help="the owner with the LLM at its load, per trial")
    g.add_argument("--owner-cgroup", default="llm_cotenant", type=cli.cgroup_name, help="its cgroup")
    g = p.add_argument_group("LLM")
    g.add_argument("--llm-fraction", type=num(gt=0), default=0.5,
                   help="the interactive load's Poisson rate / the paper's quota's capacity (calibrated)")
    g.add_argument("--llm-rate", type=num(gt=0), default=None, help="that rate in req/s (no calibration)")
    g.add_argument("--saturate-concurrency", type=num(int, ge=1), default=4,
                   help="closed-loop depth of the saturated load (and the calibration)")
    g.add_argument("--max-new-tokens", type=num(int, ge=1), default=32, help="tokens per request")
    g.add_argument("--slo", type=cli.checked_by(arrivals.parse_slo), default=rep.DEFAULT_SLO, help="goodput SLO")
    g.add_argument("--port", type=num(int, ge=1, le=65535), default=18000, help="the service's port")
    g.add_argument("--cgroup-name", default=configs.CGROUP_NAME, type=cli.cgroup_name,
                   help="the service cgroup")
    g.add_argument("--torch-threads", default=None,
                   help="passed to the service (default: the service's own default)")
    g.add_argument("--engine-args", default=ENGINE_ARGS,
                   help="the service's engine options, the same for every configuration (so that only the "
                        "controls differ): the serving default, batched; threads from the CPU it may use")
    g.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    a = p.parse_args(argv)
    if a.quick:
        given = set(argv)
        for flag, key, value in (("--alone-s", "alone_s", 4.0), ("--with-s", "with_s", 6.0),
                                 ("--max-new-tokens", "max_new_tokens", 4)):
            if flag not in given:
                setattr(a, key, value)
    if a.force and a.resume:
        p.error("--force and --resume exclude each other")
    defaults = PILOT if a.pilot else dict(configs=",".join(rep.CONFIGS), owners=",".join(rep.OWNERS),
                                         loads=",".join(rep.LOADS))
    for key in ("configs", "owners", "loads"):
        if getattr(a, key) is None:
            setattr(a, key, defaults[key].split(","))
    return a


SETTINGS = ("interactive", "batch", "alone_s", "with_s", "llm_fraction", "saturate_concurrency", "max_new_tokens",
            "slo", "seed", "torch_threads", "engine_args", "tiny")


def prepare(a) -> dict:
    """plan.json's contents, checked against this run: settings and commit (a part resumed from another commit, or
    with other settings, is refused)."""
    path = os.path.join(a.results_dir, "plan.json")
    doc = rep.read_json(path) or {}
    mine = {k: getattr(a, k) for k in SETTINGS}
    if doc and not a.pilot and not a.force:
        changed = [k for k in SETTINGS if k in doc.get("settings", {}) and doc["settings"][k] != mine[k]]
        if changed:
            raise ValueError(f"{path} was made with other settings ({', '.join(changed)}); use those, or --force")
        head = code_state()["git_commit"]
        if a.resume and doc.get("git_commit") and doc.get("git_commit") != head:
            raise ValueError(f"{path} started at commit {doc['git_commit'][:12]}, this is {str(head)[:12]}: a "
                             f"part runs from the same commit (or --force)")
    if a.force and not a.pilot:        # a new grid: its settings, and the calibration redone with them
        for key in ("quota_capacity_rps", "quota_tokens_per_s", "rate_rps"):
            doc.pop(key, None)
        if doc.get("settings") and doc["settings"] != mine:
            doc["pilot_settings"] = doc["settings"]
        doc["settings"] = mine
    doc.setdefault("settings", mine)
    doc.update({k: v for k, v in code_state().items() if k not in doc or a.force or a.pilot})
    return doc


def existing(d):
    return sorted(glob.glob(os.path.join(d, "trials", "*")))


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    out_dir = os.path.join(a.results_dir, "pilot") if a.pilot else a.results_dir
    try:
        if not a.report_only:
            if os.geteuid() != 0:
                print(f"{PROG}: error: must run as root (sudo): the owner and the LLM each run in a cgroup of "
                      f"their own (--report-only needs no root)", file=sys.stderr)
                return 2
            found = existing(out_dir)
            if found and not (a.force or a.resume):
                print(f"{PROG}: error: {out_dir} holds trials ({len(found)} files); --resume continues them, "
                      f"--force replaces them", file=sys.stderr)
                return 2
            doc = prepare(a)
            if a.force:
                for path in found:
                    os.remove(path)
            os.makedirs(os.path.join(out_dir, "trials"), exist_ok=True)
            for s in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, cotenant._interrupt)
            h = runs.Harness(a)
            h.calibrate(doc)
            plan_path = os.path.join(a.results_dir, "plan.json")
            trials = a.pilot_trials if a.pilot else (a.trials or doc.get("trials"))
            if not trials:
                raise ValueError(f"no trial count: run the pilot first ({PROG} --pilot) or give --trials")
            cells = [f"{c}:{o}:{l}" for c in a.configs for o in a.owners for l in a.loads]
            doc.update(seed=a.seed, slo=a.slo)
            with open(plan_path, "w") as f:
                json.dump(doc, f, indent=1)
            h.say(f"{'pilot' if a.pilot else 'grid'}: {runs.duration_text(a, len(cells), trials)} -> {out_dir}")
            sub = argparse.Namespace(**{**vars(a), "results_dir": out_dir})
            h.a = sub
            h.run_trials(runs.plan(cells, trials, a.seed))
            if a.pilot:
                doc["power"] = runs.power_plan(out_dir, trials)
                doc["trials"] = doc["power"]["trials"]
                full = len(rep.CONFIGS) * len(rep.OWNERS) * len(rep.LOADS)
                doc["grid_duration"] = runs.duration_text(a, full, doc["trials"] or 0)
                with open(plan_path, "w") as f:
                    json.dump(doc, f, indent=1)
                h.say(f"power: {doc['trials']} trials per cell resolve the goal's differences; the grid: "
                      f"{doc['grid_duration']} (plan.json)")
        print(rep.report(out_dir), end="")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; complete trials are kept in {out_dir}", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if a.report_only else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
