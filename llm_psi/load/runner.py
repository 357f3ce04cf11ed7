"""The experiment runner behind run_experiments.sh and run_psi_experiments.sh, and wrap(): the one place that
builds a `cgroup_lib.py run` command.

  python -m llm_psi.load.runner --script run_experiments.sh --default-configs "baseline cgroups" [options]

One cell = one config at one concurrency: <dir>/<config>_c<N>.csv + .json + _timeline.csv, written by the
generator one trial per run. Trials interleave: trial k of every cell, in a seeded random order, before trial
k+1 of any, so that drift over the sweep spreads over every configuration alike. As root, every trial runs in
a cgroup made for it by cgroup_lib.py: limited configs under the quota, baseline unlimited. The options are
parsed by hand so that every message is the one the scripts have always given (one line, exit status 2).
"""
import os
import random
import re
import signal
import subprocess
import sys
import time

from llm_psi import REPO, cgroups, config

STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
FLAGS = {"--tiny": "tiny", "--quick": "quick", "--force": "force", "--resume": "resume"}
VALUED = ("--configs", "--concurrency", "--cells", "--num-requests", "--max-new-tokens", "--trials", "--seed",
          "--results-dir", "--cgroup-name", "--cpu-quota", "--cpu-period-us", "--memory-max", "--engine",
          "--model", "--mode", "--port")
USAGE = """\
Usage: sudo bash {script} [options]

Runs every trial of every cell (config x concurrency level) through request_generator.py, which writes
<results-dir>/<config>_c<N>.csv, .json and _timeline.csv. Trial k of every cell runs before trial k+1 of
any, in a random order drawn from --seed. As root each trial runs in a cgroup made for it by cgroup_lib.py:
limited configs under the limits below, baseline with no limits (its counters are then its own). Without
root only unlimited configs can run, outside any cgroup of their own.

Options (defaults reproduce the paper):
  --configs "LIST"         configs to run (default: "{default_configs}")
  --concurrency "LIST"     concurrency levels of every config (default: "1 2 4 8")
  --cells "LIST"           further cells as config:level, e.g. "limit1:1 limit1:8" (default: none)
  --num-requests N         requests per trial (default: 20)
  --max-new-tokens N       tokens per request (default: 50)
  --trials N               trials per cell (default: 1)
  --seed N                 seed of the run order (default: 0)
  --results-dir DIR        output directory (default: runs, git-ignored; the committed reproduction in
                           results/ is rewritten only with --results-dir results --force)
  --force                  replace cells that exist in the results directory
  --resume                 keep the finished trials of existing cells and run the missing ones
  --cgroup-name NAME       service cgroup name (default: {name})
  --cpu-quota PERCENT      CPU limit in percent of one CPU, > 0 (default: {quota:g})
  --cpu-period-us N        CPU period, 1000..1000000 (default: {period})
  --memory-max SIZE        memory limit, e.g. 4G (default: {memory})
  --engine loop|generate   our decode loop or Hugging Face generate() (default: each label's own: generate
                           for the paper's three, as its code ran, loop for the others)
  --mode in-process|service   in-process: the generator runs the service in its own process, inside the
                           cell's cgroup (the paper); service: llm_server.py serve alone runs in the
                           cell's cgroup and the generator sends it HTTP requests from outside (default:
                           in-process)
  --port N                 the service's port in service mode (default: 18000)
  --model PATH_OR_ID       pretrained weights (passed to the generator)
  --tiny                   tiny GPT-2 config (tests)
  --quick                  smoke run: concurrency "1 2", 4 requests, 8 tokens
  -h, --help               this help

Analyse the cells with: python analyze_results.py --results-dir <results-dir>
Environment: PYTHON (interpreter; else .venv/bin/python beside this script, else python3),
SWEEP_GENERATOR (generator script; default request_generator.py beside this script)."""


class Die(Exception):
    """A one-line error: '<script>: error: <message>', exit status 2."""


class Stopped(Exception):
    """A stop signal arrived while the sweep ran."""


def wrap(cmd, limited, *, name=config.CGROUP_NAME, meta=None, quota=config.CPU_QUOTA_PCT,
         period_us=config.CPU_PERIOD_US, memory_max=config.MEMORY_MAX, root=None, python=None,
         cpu_weight=None, cpu_idle=False, cpu_burst_us=None, own=False, cpus=None):
    """argv that runs cmd in a cgroup made for it by `cgroup_lib.py run`: limited (a bool, or a config label
    whose config.is_limited() and config.cgroup_settings() preset this and the sharing controls) under the
    quota, period and memory limit; otherwise, as root (root=None: this process's euid), in an --unlimited
    cgroup of its own. cpu_weight, cpu_idle, cpu_burst_us: cgroup_lib's --cpu-weight, --cpu-idle,
    --cpu-burst-us (a label's preset fills those not given). Not root, with no quota, no sharing control and
    no need of a cgroup of its own (own): cmd itself, in no cgroup."""
    if isinstance(limited, str):
        preset = config.cgroup_settings(limited)
        cpu_weight = preset.get("weight") if cpu_weight is None else cpu_weight
        cpu_idle = cpu_idle or bool(preset.get("idle"))
        cpu_burst_us = preset.get("burst_us") if cpu_burst_us is None else cpu_burst_us
        own = own or bool(preset.get("own"))
        cpus = preset.get("cpus") if cpus is None else cpus
        limited = config.is_limited(limited)
    sharing = ((["--cpu-weight", str(cpu_weight)] if cpu_weight is not None else [])
               + (["--cpu-idle"] if cpu_idle else [])
               + (["--cpu-burst-us", str(cpu_burst_us)] if cpu_burst_us is not None else [])
               + (["--cpus", _cpus(cpus)] if cpus is not None else []))
    root = os.geteuid() == 0 if root is None else root
    if not limited and not root and not sharing and not own:
        return list(cmd)
    limits = (["--cpu-quota", _number(quota), "--cpu-period-us", str(period_us), "--memory-max", str(memory_max)]
              if limited else ["--unlimited"])
    return [python or sys.executable, os.path.join(REPO, "cgroup_lib.py"), "run", "--name", name, *limits,
            *sharing, *(["--meta", meta] if meta else []), "--", *cmd]


def _cpus(value) -> str:
    """A preset's CPU list: 'last' is the highest CPU this process may use; anything else as given."""
    return str(max(os.sched_getaffinity(0))) if value == "last" else str(value)


def _number(value):
    """50.0 -> '50', 12.5 -> '12.5', '25' -> '25'."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def plan(cells, trials, seed):
    """[(trial, config, level)]: round k holds trial k of every cell, each round shuffled by one
    random.Random(seed) in turn (the order the sweeps have always used)."""
    rng, runs = random.Random(seed), []
    for k in range(1, trials + 1):
        order = list(cells)
        rng.shuffle(order)
        runs += [(k, *cell.split(":")) for cell in order]
    return runs


def _need_int(opt, value):
    if not re.fullmatch(r"[1-9][0-9]*", value):
        raise Die(f"{opt} must be a positive integer, got '{value}'")


def parse(argv, default_configs):
    """The options as a dict of strings and flags; None after printing the usage for -h/--help."""
    o = {"configs": default_configs, "cells": "", "trials": "1", "seed": "0", "results_dir": "runs",
         "cgroup_name": config.CGROUP_NAME, "cpu_quota": f"{config.CPU_QUOTA_PCT:g}",
         "cpu_period_us": str(config.CPU_PERIOD_US), "memory_max": config.MEMORY_MAX, "engine": "",
         "model": "", "mode": "in-process", "port": "18000", "concurrency": None, "num_requests": None,
         "max_new_tokens": None, **{v: False for v in FLAGS.values()}}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            return None
        if arg in FLAGS:
            o[FLAGS[arg]], i = True, i + 1
            continue
        if arg not in VALUED:
            raise Die(f"unknown option '{arg}' (see --help)")
        if i + 1 >= len(argv):
            raise Die(f"{arg} needs a value")
        o[arg[2:].replace("-", "_")], i = argv[i + 1], i + 2
    quick = {"concurrency": "1 2", "num_requests": "4", "max_new_tokens": "8"}
    full = {"concurrency": "1 2 4 8", "num_requests": "20", "max_new_tokens": "50"}
    for key, value in (quick if o["quick"] else full).items():
        o[key] = value if o[key] is None else o[key]
    _check(o)
    return o


def _check(o):
    o["config_list"], o["levels"], o["extra"] = o["configs"].split(), o["concurrency"].split(), o["cells"].split()
    if not o["config_list"] and not o["extra"]:
        raise Die("--configs and --cells are both empty")
    if o["config_list"] and not o["levels"]:
        raise Die("--concurrency is empty")
    for c in o["levels"]:
        _need_int("--concurrency", c)
    for cell in o["extra"]:
        if not re.fullmatch(r"[A-Za-z0-9_]+:[1-9][0-9]*", cell):
            raise Die(f"--cells takes config:level items, got '{cell}'")
    for opt in ("--num-requests", "--max-new-tokens", "--trials", "--cpu-period-us"):
        _need_int(opt, o[opt[2:].replace("-", "_")])
    if not 1000 <= int(o["cpu_period_us"]) <= 1000000:
        raise Die(f"--cpu-period-us must be within 1000..1000000, got '{o['cpu_period_us']}'")
    if not re.fullmatch(r"[0-9]+", o["seed"]):
        raise Die(f"--seed must be an integer >= 0, got '{o['seed']}'")
    q = o["cpu_quota"]
    if not re.fullmatch(r"[0-9]+([.][0-9]+)?", q) or re.fullmatch(r"0*([.]0*)?", q):
        raise Die(f"--cpu-quota must be a number > 0, got '{q}'")
    if not re.fullmatch(r"[1-9][0-9]*[KMGTkmgt]?|max", o["memory_max"]):
        raise Die(f"--memory-max must be a size > 0 such as 4G, 512M or max, got '{o['memory_max']}'")
    if o["engine"] and o["engine"] not in config.ENGINES:
        raise Die(f"--engine must be loop or generate, got '{o['engine']}'")
    if o["mode"] not in ("in-process", "service"):
        raise Die(f"--mode must be in-process or service, got '{o['mode']}'")
    if not re.fullmatch(r"[1-9][0-9]{0,4}", o["port"]) or int(o["port"]) > 65535:
        raise Die(f"--port must be within 1..65535, got '{o['port']}'")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", o["cgroup_name"]):
        raise Die("--cgroup-name must be letters, digits, _ . - only")
    if o["force"] and o["resume"]:
        raise Die("--force and --resume exclude each other")
    for key in ("trials", "seed"):
        o[key] = int(o[key])


def load_cells(o, generator):
    """The cells in run order of definition, and {config: limited} from the generator's --list-configs."""
    if not os.path.isfile(generator):
        raise Die(f"generator {generator} not found")
    p = subprocess.run([sys.executable, generator, "--list-configs"], stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise Die(f"{generator} --list-configs failed")
    limited = {}
    for line in p.stdout.splitlines():
        name, kind = (line.split() + ["", ""])[:2]
        if name:
            limited[name] = kind == "limited"
    cells = [f"{cfg}:{c}" for cfg in o["config_list"] for c in o["levels"]]
    cells += [cell for i, cell in enumerate(o["extra"]) if cell not in cells and cell not in o["extra"][:i]]
    for cell in cells:
        if cell.split(":")[0] not in limited:
            raise Die(f"unknown config '{cell.split(':')[0]}' (known: {' '.join(limited)})")
    return cells, limited


def check_existing(o, cells):
    """Refuse before anything runs if a cell exists, unless --force or --resume."""
    if o["force"] or o["resume"]:
        return
    found = []
    for cell in cells:
        cfg, c = cell.split(":")
        stem = os.path.join(o["results_dir"], f"{cfg}_c{c}")
        if any(os.path.exists(stem + s) for s in (".csv", ".json", "_timeline.csv")):
            found.append(stem + ".csv")
    if found:
        raise Die(f"{len(found)} cell(s) exist already ({found[0]} ...); --force replaces them, --resume "
                  f"completes them, or choose another --results-dir")


class Sweep:
    """Runs the planned trials one by one; stop() is what a stop signal or a failed trial leads to."""

    def __init__(self, script, o, generator, limited):
        self.script, self.o, self.generator, self.limited = script, o, generator, limited
        self.child = self.server = None
        self.in_cgroup = False
        self.t0 = time.monotonic()

    def commands(self, k, cfg, c, index):
        """(generator argv, argv of what runs in the cell's cgroup or None in-process, where-text)."""
        o, py, out = self.o, sys.executable, os.path.join(self.o["results_dir"], f"{cfg}_c{c}.csv")
        engine = ["--engine", o["engine"]] if o["engine"] else []   # none given: the label's preset
        cmd = [py, self.generator, "--config", cfg, "--concurrency", c, "--num-requests", o["num_requests"],
               "--max-new-tokens", o["max_new_tokens"], "--trials", str(o["trials"]), "--trial", str(k),
               "--run-index", str(index), *engine, "--output", out, "--quiet"]
        cmd += ["--force"] if o["force"] and k == 1 else ["--resume"] if o["resume"] or k > 1 else []
        extra = ["--tiny"] * o["tiny"] + (["--model", o["model"]] if o["model"] else [])
        cmd += extra
        served = cmd
        if o["mode"] == "service":
            served = [py, os.path.join(REPO, "llm_server.py"), "serve", "--config", cfg, "--port", o["port"],
                      *engine, *extra]
            cmd += ["--target", f"http://127.0.0.1:{o['port']}", "--wait-ready-s", "600"]
        root = os.geteuid() == 0
        self.in_cgroup = self.limited[cfg] or root
        where = (f"in cgroup {o['cgroup_name']}" if self.limited[cfg] else
                 f"in unlimited cgroup {o['cgroup_name']}" if root else "unlimited")
        sharing = config.cgroup_settings(cfg)
        served = wrap(served, self.limited[cfg], name=o["cgroup_name"], meta=out[:-4] + ".json",
                      quota=o["cpu_quota"], period_us=o["cpu_period_us"], memory_max=o["memory_max"], root=root,
                      cpu_weight=sharing.get("weight"), cpu_idle=bool(sharing.get("idle")),
                      cpu_burst_us=sharing.get("burst_us"), own=bool(sharing.get("own")))
        if o["mode"] == "service":
            return cmd, served, f"service {where}, generator outside it", out
        return served, None, where, out

    def run_trial(self, k, cfg, c, index, total):
        cmd, served, where, out = self.commands(k, cfg, c, index)
        if served:
            self.server = subprocess.Popen(served)
        print(f"[{index}/{total}] trial {k}/{self.o['trials']} {cfg} c={c} ({where}) -> {out}   "
              f"(sweep {int(time.monotonic() - self.t0) // 60} min so far)", flush=True)
        self.child = subprocess.Popen(cmd)
        rc = self.child.wait()
        self.child = None
        self.stop_server()
        if rc != 0:
            rc = 128 - rc if rc < 0 else rc
            print(f"{self.script}: trial {k} of {cfg} c={c} failed (exit status {rc}); finished trials are kept",
                  file=sys.stderr, flush=True)
            self.cleanup_cgroup()
            return rc
        self.in_cgroup = False
        return 0

    def stop_server(self):
        """SIGTERM drains the service; cgroup_lib.py run forwards it and removes the cgroup."""
        if self.server is not None:
            _terminate(self.server)
            self.server = None

    def cleanup_cgroup(self):
        if self.in_cgroup:
            try:
                cgroups.cleanup(self.o["cgroup_name"], log=lambda m: print(m, file=sys.stderr, flush=True))
            except cgroups.CgroupError as e:
                print(f"{self.script}: {e}", file=sys.stderr, flush=True)

    def stop(self, signame):
        """Stop the running trial (and service), remove its cgroup."""
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        print(f"{self.script}: {signame} received; stopping the running cell", file=sys.stderr, flush=True)
        if self.child is not None:
            _terminate(self.child)
        self.stop_server()
        self.cleanup_cgroup()


def _terminate(proc):
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass
    while True:
        try:
            proc.wait()
            return
        except Stopped:
            pass


def _raise_stopped(signum, _frame):
    raise Stopped(signum)


def prepare(script, argv, default_configs):
    """Everything before the first trial: options, cells, root, the cgroup mode, the existing cells."""
    o = parse(argv, default_configs)
    if o is None:
        print(USAGE.format(script=script, default_configs=default_configs, name=config.CGROUP_NAME,
                           quota=config.CPU_QUOTA_PCT, period=config.CPU_PERIOD_US, memory=config.MEMORY_MAX))
        return None
    generator = os.environ.get("SWEEP_GENERATOR") or os.path.join(REPO, "request_generator.py")
    cells, limited = load_cells(o, generator)
    root = os.geteuid() == 0
    if any(limited[cell.split(":")[0]] or config.needs_own_cgroup(cell.split(":")[0]) for cell in cells) and not root:
        raise Die("must run as root to create the service cgroup for config(s) other than baseline; try: "
                  f"sudo bash {script} {' '.join(argv)}")
    if root:
        try:
            mode = cgroups.describe_mode()
        except (cgroups.CgroupError, OSError, KeyError) as e:
            raise Die(f"cannot detect the cgroup mode: {e}") from None
        print(f"cgroups: {mode}; limits: cpu {o['cpu_quota']}% of one CPU (period {o['cpu_period_us']} us), "
              f"memory {o['memory_max']}", flush=True)
    else:
        print("not root: unlimited cells run outside a cgroup of their own and record no cgroup counters",
              flush=True)
    check_existing(o, cells)
    return o, generator, cells, limited


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    script, default_configs = "runner.py", " ".join(config.PAPER[:2])
    while argv[:1] and argv[0] in ("--script", "--default-configs") and len(argv) >= 2:
        script, default_configs = (argv[1], default_configs) if argv[0] == "--script" else (script, argv[1])
        argv = argv[2:]
    try:
        ready = prepare(script, argv, default_configs)
    except Die as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    if ready is None:
        return 0
    o, generator, cells, limited = ready
    runs = plan(cells, o["trials"], o["seed"])
    sweep = Sweep(script, o, generator, limited)
    old = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS}
    try:
        os.makedirs(o["results_dir"], exist_ok=True)
        print(f"sweep ({o['mode']}): cells \"{' '.join(cells)}\", {o['num_requests']} requests, "
              f"{o['max_new_tokens']} tokens, {o['trials']} trial(s) interleaved in random order (seed {o['seed']})"
              f" -> {o['results_dir']}/", flush=True)
        for i, (k, cfg, c) in enumerate(runs, 1):
            rc = sweep.run_trial(k, cfg, c, i, len(runs))
            if rc:
                return rc
    except Stopped as e:
        signum = signal.Signals(e.args[0])
        sweep.stop(signum.name)
        return STOP_SIGNALS[signum]
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    print(f"sweep done: {len(runs)} trial(s) of {len(cells)} cell(s) in {o['results_dir']}/; "
          f"analyse with: python analyze_results.py --results-dir {o['results_dir']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
