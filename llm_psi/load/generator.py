"""The load: N prompts sent to the service, one CSV row per request.

    python request_generator.py --config baseline --concurrency 8 --num-requests 20   # -> runs/baseline_c8.csv
    python request_generator.py --target http://127.0.0.1:8000 --config cgroups ...  # a running llm_server.py serve
    python request_generator.py --arrival poisson --rate 0.2 --num-requests 20 ...   # open loop

Load shapes: the paper's closed loop (default): C workers, submissions --spacing-ms apart, a worker takes the
next request when it is free; or open loop (``--arrival constant|poisson|gamma``): a schedule of absolute send
times drawn up front from --seed (arrivals.py), each request sent at its time whatever is in flight
(``--max-concurrency`` caps it), its intended time recorded as t_intended_s.

Clients only submit and record: in-process, the rows come from ``service.Service.submit`` (the one request
lifecycle); with ``--target URL`` from the HTTP service of ``llm_server.py serve``, timed at the client
(t_submit, first streamed token, last token), with the server's admission and start offsets (srv_*_s, seconds
after the request reached the server) placed on the client's clock at the request's send time.

The run records raw timestamps only (seconds since the trial began, monotonic clock); the derived columns
come from ``metrics.derive``. Rows are appended and flushed as requests finish, so an interrupted run keeps
every finished row. A metadata JSON with the same stem holds the frozen run config, the environment, the
cgroup limits and counters, one record per trial, and ``complete``: false until the last planned trial's
last row is written and flushed, so a killed run never looks complete. ``--deadline-s`` ends each trial at
that time after its start as a complete measurement: nothing is sent after it, and the requests then in
flight are stopped and written as rows with status ``cut`` ending at the deadline (so a starved service's
trial still ends, and ok requests / the trial's span is its throughput).

New cells go to runs/ (git-ignored) by default. An existing cell is never overwritten silently: ``--force``
replaces it, ``--resume`` keeps its finished trials and runs the missing ones (a sweep uses ``--trial K
--resume`` to add trial K to a cell, so that trials of different cells can interleave).
"""
from __future__ import annotations

import argparse
import os
import sys

from llm_psi import cli
from llm_psi.cli import UsageError, finite_number, option
from llm_psi.config import ARRIVALS, CONFIGS, RunConfig  # noqa: F401  (CONFIGS: the presets, --list-configs)
from llm_psi.load import cotenant
from llm_psi.load.cell_files import COLUMNS, DEFAULT_OUTPUT  # noqa: F401  (COLUMNS: the CSV schema)
from llm_psi.load.cell_run import run

COUNT = finite_number(int, ge=1)              # a positive integer
INDEX = finite_number(int, ge=0)
DURATION_MS = finite_number(float, gt=0)


def _opt(group, *flags, **kw):
    return option(group, RunConfig, *flags, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = cli.OptionParser(prog=os.path.basename(sys.argv[0]) or "request_generator.py",
                description="Send concurrent prompts to the in-process GPT-2 engine; one CSV row per request. "
                            "Defaults are the paper's; a --config label presets the options it names "
                            "(--list-configs), and an explicit option wins over the preset.")
    g = p.add_argument_group("cell")
    cli.add_config_option(g)
    _opt(g, "--concurrency", type=COUNT, help="worker threads (closed loop); the cell's c")
    _opt(g, "--num-requests", type=COUNT, help="requests per trial")
    _opt(g, "--spacing-ms", type=finite_number(float, ge=0), help="closed loop: time between submissions")
    _opt(g, "--trials", type=COUNT, help="trials planned for the cell")
    _opt(g, "--deadline-s", type=finite_number(float, gt=0),
         help="end each trial this many seconds after its start, a complete measurement: nothing is sent "
              "after it, and the requests in flight are stopped and recorded with status 'cut' (their "
              "t_end_s is the deadline); None: a trial ends when its last request does")
    g.add_argument("--trial", type=COUNT, default=None,
                   help="run only trial K of the cell (with --resume: add it to the cell's finished trials)")
    g.add_argument("--run-index", type=INDEX, default=None,
                   help="this run's position in its sweep, recorded with the trial")
    g.add_argument("--list-configs", action="store_true", help="print 'name limited|unlimited' and exit")
    g = p.add_argument_group("output (nothing is overwritten silently)")
    g.add_argument("--output", default=None,
                   help=f"CSV path; the metadata JSON and <stem>_timeline.csv go beside it (default: "
                        f"{DEFAULT_OUTPUT})")
    g.add_argument("--force", action="store_true", help="replace an existing cell")
    g.add_argument("--resume", action="store_true",
                   help="keep an existing cell's finished trials and run the missing ones (same settings only)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="store_true", help="log every admission decision")
    _opt(g, "--timeline-interval-ms", type=DURATION_MS, help="pressure/throttling timeline sample interval")
    g = p.add_argument_group(
        "open loop", "--arrival constant|poisson|gamma sends request i at its intended time t_i, drawn up front "
        "from --seed: gaps 1/R (constant), exponential with mean 1/R (poisson), gamma with shape B and mean 1/R "
        "(gamma; B < 1 is burstier); the first at 0. Nothing waits for a free worker unless --max-concurrency.")
    _opt(g, "--arrival", choices=ARRIVALS, help="closed: the paper's closed loop")
    _opt(g, "--rate", type=finite_number(float, gt=0), help="R, requests per second (open loop)")
    _opt(g, "--burstiness", type=finite_number(float, gt=0), help="B, the gamma shape (1 = Poisson)")
    _opt(g, "--duration", type=finite_number(float, gt=0),
         help="seconds of arrivals instead of --num-requests (open loop)")
    _opt(g, "--max-concurrency", type=COUNT, help="cap on requests in flight (open loop; None: no cap)")
    _opt(g, "--slo", help="'ttft:MS,e2e:MS,...': goodput = ok requests per second meeting every bound")
    g = p.add_argument_group("service", "in-process (default) or a running `llm_server.py serve` at --target")
    g.add_argument("--target", default=None,
                   help="http://HOST:PORT of a running service; its --config must match this cell's label")
    _opt(g, "--wait-ready-s", type=finite_number(float, ge=0),
         help="with --target: wait up to this long for the service's /health to say ready")
    g = p.add_argument_group("co-tenant", "other work on the host, in a sibling cgroup of its own, started after "
                                          "the warm-up; its throughput is sampled every second")
    _opt(g, "--antagonist", help="cpu:N built-in CPU burner processes, probe:PERIOD_MS:WORK_MS (an interactive program that "
              "wakes every period and computes WORK_MS; its wake-up and completion delays are recorded), both "
              "joined by + (cpu:2+probe:100:10), or a command such as 'stress-ng --cpu 2'")
    _opt(g, "--antagonist-quota", type=finite_number(float, gt=0),
         help="its CPU quota, percent of one CPU (None: unlimited)")
    _opt(g, "--antagonist-schedule", help="'off:45,on:60,off:45': seconds off and on from each trial's start "
                                          "(paused with SIGSTOP while off; the last state stays; a trial lasts "
                                          "at least the schedule; None: always on)")
    g = p.add_argument_group("requests")
    _opt(g, "--max-new-tokens", type=COUNT, help="exact tokens per request")
    g.add_argument("--prompts", dest="prompts_file", default=None, help="file with one prompt per line "
                                                                        "(default: 10 built-in prompts)")
    g.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up request")
    cli.add_service_options(p, RunConfig)
    return p


def parse_config(argv, default_output=DEFAULT_OUTPUT) -> RunConfig:
    """argv -> validated, frozen RunConfig. Raises UsageError with a one-line message.
    Precedence: an explicit option, then the --config preset, then the RunConfig default."""
    a = vars(build_parser().parse_args(argv))
    a.pop("list_configs")
    cli.resolve(a, RunConfig, keep_none=("output", "trial", "run_index", "adaptive_max"))
    if a["trial"] is not None and a["trial"] > a["trials"]:
        raise UsageError(f"--trial {a['trial']} is beyond --trials {a['trials']}")
    if a["force"] and a["resume"]:
        raise UsageError("--force and --resume exclude each other")
    if a["adaptive_max"] is None:
        a["adaptive_max"] = a["concurrency"]
    _check_load(a)
    if a["output"] is None:
        a["output"] = default_output.format(config=a["config"], concurrency=a["concurrency"])
    if not a["output"].endswith(".csv") or a["output"].endswith("_timeline.csv"):
        raise UsageError(f"--output must name a .csv file not ending in _timeline.csv (its .json and "
                         f"_timeline.csv go beside it), got {a['output']!r}")
    return RunConfig(**a)


def _check_load(a: dict) -> None:
    """Open-loop options only with an open-loop arrival, and what it needs; a well-formed --slo and --target."""
    from llm_psi.load import arrivals
    open_loop = a["arrival"] != "closed"
    if open_loop and a["rate"] is None:
        raise UsageError(f"--arrival {a['arrival']} needs --rate (requests per second)")
    for key in ("rate", "duration", "max_concurrency"):
        if not open_loop and a[key] is not None:
            raise UsageError(f"--{key.replace('_', '-')} applies to an open loop (--arrival constant|poisson|gamma)")
    if a["burstiness"] != 1.0 and a["arrival"] != "gamma":
        raise UsageError("--burstiness applies to --arrival gamma")
    for key, check in (("slo", arrivals.parse_slo), ("antagonist", cotenant.parse_spec)):
        if a[key] is not None:
            try:
                check(a[key])
            except ValueError as e:
                raise UsageError(f"--{key}: {e}") from None
    for key in ("antagonist_quota", "antagonist_schedule"):
        if a["antagonist"] is None and a[key] is not None:
            raise UsageError(f"--{key.replace('_', '-')} needs --antagonist")
    if a["antagonist_schedule"] is not None:
        from llm_psi.analysis import phases
        try:
            phases.parse_schedule(a["antagonist_schedule"])
        except ValueError as e:
            raise UsageError(f"--antagonist-schedule: {e}") from None
    if a["target"] is not None:
        from urllib.parse import urlparse
        u = urlparse(a["target"])
        if u.scheme not in ("http", "https") or not u.netloc:
            raise UsageError(f"--target must be http://HOST:PORT, got {a['target']!r}")


def main(argv=None, default_output=DEFAULT_OUTPUT) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.path.basename(sys.argv[0]) or "request_generator.py"
    try:
        if "--list-configs" in argv:
            for name, preset in CONFIGS.items():
                print(name, "limited" if preset["limited"] else "unlimited")
            return 0
        return run(parse_config(argv, default_output))  # refuses bad input before the model loads
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
