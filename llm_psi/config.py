"""Every option of the suite and its default, in one place: the configuration labels of the experiment grid
and what each presets, the service's options (ServiceConfig), a run's (RunConfig), and the cgroup limits.

Imports nothing of the project: the service, the load, the benchmarks and the analysis all read it. A label's
preset names ServiceConfig fields; ``limited`` says whether its cells must run under the CPU quota of the
service cgroup (the sweeps put them there, and the generator refuses them elsewhere). The argparse side of
these options (help, checks, precedence of --config presets) is in ``llm_psi.cli``.
"""
from __future__ import annotations

import dataclasses
import os

PAPER = ("baseline", "cgroups", "psi")  # the paper's three configurations, in its order

# The paper's static limits of a limited cell: cpu.max 50% of one CPU over a 100 ms period, memory.max 4 GiB.
CPU_QUOTA_PCT = 50.0
CPU_PERIOD_US = 100000
MEMORY_MAX = "4G"
MEMORY_MAX_BYTES = 4 << 30
CGROUP_NAME = "llm_service"      # the service cgroup of a cell

# the HTTP server's defaults (llm_server.py serve)
MAX_BODY_BYTES = 1 << 20         # the largest request body (413 past it)
DRAIN_TIMEOUT_S = 30.0           # after SIGTERM/SIGINT: wait this long for requests in flight
API_KEY_ENV = "LLM_PSI_API_KEY"  # the environment variable that sets --api-key

ENGINES = ("loop", "generate", "ort")  # our decode loop | Hugging Face generate() | the loop on ONNX Runtime
                                      # (engine.loop.make_engine kinds)
ARRIVALS = ("closed", "constant", "poisson", "gamma")
TOP_K = 50                       # sampling among the k likeliest tokens: Hugging Face generate()'s default
DTYPES = ("float32", "bfloat16")  # weights, activations and KV cache (engine.net); logits and sampling float32
QUANTIZE = ("none", "int8")       # int8: dynamic int8 linear layers (float32 only)
ORT_KV = ("concat", "shared")     # the ort engine's KV cache: concatenated per step | updated in place

# The engine's precision: the paper's three configurations pin float32 (the faithful reproduction); the
# batching ones, and ``llm_server.py serve`` without --config (SERVE_DEFAULTS), take dynamic int8, the fastest
# setting within the accuracy guard (engine.accuracy; measured in issue 19: ~3x float32's tokens per
# CPU-second at batch 1, ~1.7-2.9x at batch 8-32, one thread).
# The engine: the batching presets and ``serve`` without --config run ``ort`` (our loop and scheduler on ONNX
# Runtime's forward, issue 31: in int8 under the quota it made more tokens per CPU-second than our torch
# forward at batch 1, 8, 16 and 32 in the run of results/engines/ (AVX2 host, medians of 2, no interval;
# docs/FINDINGS.md "Engines"), still 0.78-0.86x of ONNX Runtime run as a peer); the paper's three run Hugging
# Face generate() as the paper's code did.
# An explicit --dtype other than float32 selects the loop engine instead (ort runs float32 and int8 only).
FAITHFUL = dict(dtype="float32", quantize="none")
# The paper's engine as its code ran it: Hugging Face generate(), torch's own thread count, no OMP_WAIT_POLICY
# (engine.threads), and the model built and every request served on one thread, one at a time, as its
# server's stdin loop (engine.one_thread: OpenMP spins there, and not in a server's worker threads). Every
# other label and a bare `serve` take the defaults: our loop, threads and wait policy from the CPU the
# process may use, requests run on their callers' threads.
PAPER_THREADS = dict(engine="generate", torch_threads="default", omp_wait_policy="unset", engine_thread="one")
# `serve` without --config: the threads of the CPU it may use, every request on its own thread, and (where no
# precision is given, so SERVE_DEFAULTS does not apply) our loop engine, not the paper's preset of its label
SERVE_THREADS = dict(torch_threads="auto", omp_wait_policy="auto", engine_thread="caller", engine="loop")
FASTEST = dict(dtype="float32", quantize="int8")
FASTEST_ENGINE = dict(engine="ort", **FASTEST)
SERVE_DEFAULTS = dict(FASTEST_ENGINE)

CONFIGS = {
    "baseline": dict(limited=False, **FAITHFUL, **PAPER_THREADS),
    "cgroups": dict(limited=True, **FAITHFUL, **PAPER_THREADS),
    "psi": dict(limited=True, admission="gate", **FAITHFUL, **PAPER_THREADS),
    "cgroups_threads": dict(limited=True, torch_threads="auto"),
    "psi_threads": dict(limited=True, admission="gate", torch_threads="auto"),
    "limit1": dict(limited=True, admission="limit", concurrency_limit=1, torch_threads="auto"),
    "adaptive": dict(limited=True, admission="adaptive", torch_threads="auto"),
    "batch": dict(limited=True, batching="dynamic", torch_threads="auto", **FASTEST_ENGINE),
    # batching in float32 on the torch loop engine: beside limit1 and cgroups_threads (the same engine and
    # precision, one request at a time) it isolates batching from the precision and engine of `batch`
    "batch_fp32": dict(limited=True, batching="dynamic", torch_threads="auto", engine="loop", **FAITHFUL),
    # The batch limit is the adaptive limit: a one-thread service at a 50% quota stalls ~50% of the time on
    # throttling alone, so "low" pressure sits above that floor; batching raises service time by design,
    # so the latency tolerance is wider than for one-at-a-time service.
    "batch_psi": dict(limited=True, batching="dynamic", admission="adaptive", torch_threads="auto",
                      adaptive_low_pct=60.0, adaptive_tolerance=2.0, **FASTEST_ENGINE),
    # The paper's gate reading the service cgroup's own pressure instead of the whole system's.
    "psi_cgroup": dict(limited=True, admission="gate", psi_source="cgroup"),
    # The paper's gate with no quota: what pressure-aware admission alone does next to a co-tenant.
    "psi_unlimited": dict(limited=False, admission="gate"),
    # Sharing a host (issue 21). ``cgroup`` presets the kernel's sharing controls of the service cgroup
    # (cgroup_lib.py run --cpu-weight/--cpu-idle/--cpu-burst-us); the runner's wrap() applies them.
    # weight: no quota; cpu.weight 33 against the co-tenant's default 100. On a 2-CPU host under full
    # contention that gives the service 33/133 = 25% of the CPU, half a CPU: what the paper's quota gives
    # it, so beside the co-tenant it sits where the quota sits, and alone it has every CPU. A probe at a tenth
    # of the default (10, cpu.shares 102) starved it beside two burners (0.06 req/s): too low.
    "weight": dict(limited=False, cgroup=dict(weight=33)),
    # idle: SCHED_IDLE for the whole service cgroup; it runs only on CPU time the others leave.
    "idle": dict(limited=False, cgroup=dict(idle=True)),
    # burst: the paper's quota (50 ms per 100 ms) plus a burst of one quota, the most the kernel allows.
    "burst": dict(limited=True, cgroup=dict(burst_us=50000)),
    # share: our controller (control/sharing.py) moves the service cgroup's own quota between the paper's
    # quota (floor) and every CPU from the stall of others; share_batch adds continuous batching.
    "share": dict(limited=False, cgroup=dict(own=True), sharing="share"),
    "share_batch": dict(limited=False, cgroup=dict(own=True), sharing="share", batching="dynamic"),
    # The protection study (issue 32, bench/protection): cpu.weight at 100 (the kernel's default, the owner's),
    # 10 and 1 (33 is "weight" above); headroom: a cgroup of its own that starts under the paper's quota, so
    # that the engine's threads follow the floor (one on a 2-CPU host, which caps the LLM at one CPU whatever
    # the quota), and whose quota the headroom controller (python -m llm_psi.control.headroom, started beside
    # the service by the bench) then sets from the owner's CPU use plus a headroom, in the style of Meta's
    # sideloader. Why it starts under the quota: docs/METHODS.md, "Protecting the owner".
    "weight100": dict(limited=False, cgroup=dict(weight=100)),
    "weight10": dict(limited=False, cgroup=dict(weight=10)),
    "weight1": dict(limited=False, cgroup=dict(weight=1)),
    "headroom": dict(limited=True, cgroup=dict(own=True)),
    # pinned: `idle` confined to the host's last CPU (a cpuset), so that the owner has a CPU the LLM never
    # runs on: a diagnosis more than a candidate (it caps the LLM at one CPU); beside `idle` it separates
    # what sharing a CPU costs the owner from what sharing the rest of the machine (caches, memory) does.
    "pinned": dict(limited=False, cgroup=dict(idle=True, cpus="last")),
}

CGROUP_KEYS = ("weight", "idle", "burst_us", "own", "cpus")  # what a preset's ``cgroup`` may name

# Varied prompts of 27-41 characters, as in the paper.
PROMPTS = [
    "Explain the theory of relativity.",
    "Write a short poem about the sea.",
    "What causes the seasons on Earth?",
    "Describe a busy market at dawn.",
    "Summarize the history of Rome.",
    "How do vaccines train the immune system?",
    "Give three tips for learning to cook.",
    "Why is the sky blue during the day?",
    "Tell a story about a lost robot.",
    "What is the future of renewable energy?",
]


def is_limited(label: str) -> bool:
    """True if cells of ``label`` run under the quota; unknown labels count as unlimited."""
    return bool(CONFIGS.get(label, {}).get("limited", False))


def preset(label: str) -> dict:
    """The service options ``label`` sets (without ``limited`` and ``cgroup``); KeyError for an unknown label."""
    return {k: v for k, v in CONFIGS[label].items() if k not in ("limited", "cgroup")}


def cgroup_settings(label: str) -> dict:
    """The kernel's sharing controls ``label`` presets for the service cgroup: weight (cpu.weight), idle
    (cpu.idle), burst_us (the quota's burst), own (it needs a cgroup of its own: its controller writes the
    cgroup's quota), cpus (a cpuset: a CPU list, or "last"); {} for none or an unknown label."""
    return dict(CONFIGS.get(label, {}).get("cgroup", {}))


def needs_own_cgroup(label: str) -> bool:
    """True if cells of ``label`` must run in a cgroup made for them: under a quota, with kernel sharing
    controls, or with a controller that writes the cgroup's own limits."""
    return is_limited(label) or bool(cgroup_settings(label))


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """The service's options; the load generator's RunConfig extends it with the load's."""
    config: str = "baseline"         # the label this service runs as (configs.CONFIGS)
    model: str | None = None
    tiny: bool = False
    seed: int = 0                    # weight init seed (and the base of per-request sampling seeds)
    temperature: float = 0.7
    top_k: int = TOP_K               # 0: the whole vocabulary
    torch_threads: str | None = "auto"   # auto: from the CPU it may use | default: torch's own | N
    omp_wait_policy: str = "auto"    # auto (PASSIVE unless the environment sets it) | passive | active | unset
    engine_thread: str = "caller"    # caller: each request on its caller's thread | one: the paper's server loop
    engine: str = "loop"             # loop (our decode loop) | generate (Hugging Face generate(), as the artifact)
    dtype: str = "float32"           # DTYPES
    quantize: str = "none"           # QUANTIZE
    ort_kv: str = "concat"           # ORT_KV (--engine ort only)
    batching: str = "off"
    max_batch: int = 8
    admission: str = "none"          # none | gate | limit | adaptive
    concurrency_limit: int = 1
    psi_threshold: float = 95.0
    psi_interval_ms: float = 500.0
    psi_max_checks: int = 10
    on_timeout: str = "admit"
    psi_source: str = "system"
    psi_signal: str = "avg10"
    psi_mode: str = "poll"
    adaptive_low_pct: float = 20.0   # adaptive limit: add one below this pressure (%)
    adaptive_high_pct: float = 90.0  # halve at or above this pressure (%)
    adaptive_tolerance: float = 1.5  # halve when median service exceeds the minimum by this factor
    adaptive_max: int = 8            # adaptive limit's ceiling (the batch size when batching)
    max_waiting: int | None = None   # refuse a request that would wait while this many wait (None: never)
    max_queue_delay_ms: float | None = None  # refuse a request whose wait would exceed this (None: never)
    sharing: str = "off"             # off | share: our controller of the service cgroup's quota (control/sharing.py)
    share_floor_pct: float = CPU_QUOTA_PCT   # its lowest quota, percent of one CPU (the paper's quota)
    share_ceiling_pct: float | None = None   # its highest, percent of one CPU (None: every CPU of the host)
    share_high_pct: float = 10.0     # halve the quota when others stall at least this share of the time (%)
    share_low_pct: float = 3.0       # double it when they stall at most this share (%)
    share_interval_ms: float = 1000.0
    share_signal: str = "auto"       # auto | siblings | system: where "others stall" is read


@dataclasses.dataclass(frozen=True)
class RunConfig(ServiceConfig):
    """One run: the service's options (ServiceConfig, whose ``seed`` also seeds sampling and arrivals) and
    the load's."""
    concurrency: int = 1
    num_requests: int = 20
    spacing_ms: float = 100.0
    max_new_tokens: int = 50
    trials: int = 1
    output: str = "runs/baseline_c1.csv"
    prompts_file: str | None = None
    warmup: bool = True
    quiet: bool = False
    verbose: bool = False
    timeline_interval_ms: float = 250.0
    arrival: str = "closed"          # closed (the paper) | constant | poisson | gamma (open loop)
    rate: float | None = None        # open loop: requests per second
    burstiness: float = 1.0          # gamma shape (1 = Poisson)
    duration: float | None = None    # open loop: send for this many seconds instead of --num-requests
    max_concurrency: int | None = None  # open loop: cap on requests in flight (None: none)
    deadline_s: float | None = None  # end each trial this many seconds after its start (None: when all are done)
    slo: str | None = None           # "ttft:MS,e2e:MS": goodput counts the ok requests meeting all
    target: str | None = None        # URL of a running service (llm_server.py serve); None: in-process
    wait_ready_s: float = 0.0        # with --target: wait this long for the service to become ready
    antagonist: str | None = None    # co-tenant: cpu:N built-in burners or a command
    antagonist_quota: float | None = None  # its CPU quota, percent of one CPU (None: unlimited)
    antagonist_schedule: str | None = None  # "off:45,on:60,off:45": the co-tenant comes and goes (None: always on)
    trial: int | None = None         # run only this trial of the cell (sweeps interleave cells trial by trial)
    run_index: int | None = None     # this run's position in its sweep, recorded with the trial
    force: bool = False
    resume: bool = False

    @property
    def stem(self) -> str:
        return os.path.splitext(self.output)[0]


def service_config(cfg) -> ServiceConfig:
    """The ServiceConfig part of any config object carrying its fields (e.g. the generator's RunConfig)."""
    return ServiceConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ServiceConfig)})
