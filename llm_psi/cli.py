"""The shared argparse helpers of every command: one-line errors with exit status 2, and checked numbers."""
from __future__ import annotations

import argparse
import importlib.util
import math
import re

from llm_psi import config as configs
from llm_psi.config import ServiceConfig


class UsageError(Exception):
    """Bad input found after argument parsing: one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: message`, with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")



def finite_number(kind=float, gt=None, ge=None, le=None):
    """argparse type: a finite `kind` (float or int), > gt, >= ge, <= le where given; no nan, inf."""
    bounds = " and ".join(f"{op} {v}" for op, v in ((">", gt), (">=", ge), ("<=", le)) if v is not None)

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and (gt is None or x > gt) and (ge is None or x >= ge)
                and (le is None or x <= le)):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {what} {bounds}, got {text!r}")
        return x
    return parse



def int_list(text: str) -> list[int]:
    """argparse type: a space- or comma-separated list of integers >= 1 (concurrency levels, batch sizes)."""
    values = list(dict.fromkeys(finite_number(int, ge=1)(x) for x in text.replace(",", " ").split()))
    if not values:
        raise argparse.ArgumentTypeError(f"expected a list of integers >= 1, got {text!r}")
    return values


def word_list(allowed):
    """argparse type: a space- or comma-separated list of words from ``allowed``, in order, each once."""
    def parse(text):
        values = list(dict.fromkeys(text.replace(",", " ").split()))
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected words from {', '.join(allowed)}, got {text!r}")
        return values
    return parse


def cgroup_name(text: str) -> str:
    """An argparse type: a cgroup's name of letters, digits, '_', '.' and '-' only."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        raise argparse.ArgumentTypeError(f"bad cgroup name {text!r} (letters, digits, _ . - only)")
    return text


def checked_by(check):
    """argparse type: the stripped text, once ``check(text)`` accepted it (its ValueError is the error)."""
    def parse(text):
        try:
            check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text.strip()
    return parse


class OptionParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


COUNT = finite_number(int, ge=1)
PERCENT = finite_number(float, ge=0, le=100)
DURATION_MS = finite_number(float, gt=0)


def option(group, defaults, *flags, help="", **kw):
    """An option whose default is None (= not given: the --config preset, then the dataclass ``defaults``
    apply); its help shows the dataclass default."""
    action = group.add_argument(*flags, default=None, help=help, **kw)
    action.help = f"{help} (default: {getattr(defaults, action.dest, None)})".lstrip()
    return action


def add_config_option(group) -> None:
    group.add_argument("--config", default=ServiceConfig.config,
                       help=f"configuration label: {', '.join(configs.CONFIGS)}; it presets the options it names, "
                            f"an explicit option wins (default: %(default)s)")


def add_service_options(p, defaults=ServiceConfig) -> None:
    """The service's option groups (model and decoding, admission), shared by the generator and the server."""
    g = p.add_argument_group("model and decoding")
    g.add_argument("--model", default=None, help="pretrained weights: local path or hub id (default: the GPT-2 "
                                                 "124M architecture with weights from --seed)")
    g.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    option(g, defaults, "--engine", choices=configs.ENGINES,
           help="loop: our KV-cache decode loop; generate: Hugging Face generate(), as the artifact; ort: our loop "
                "and batching on ONNX Runtime's forward (exported once, cached by weights)")
    option(g, defaults, "--dtype", choices=configs.DTYPES,
           help="weights, activations and KV cache of our engines (logits and sampling stay float32)")
    option(g, defaults, "--quantize", choices=configs.QUANTIZE,
           help="int8: dynamic int8 linear layers (GPT-2's Conv1D converted to nn.Linear; needs --dtype float32)")
    option(g, defaults, "--ort-kv", choices=configs.ORT_KV,
           help="--engine ort's KV cache: concat (copied into a new tensor each step) or shared (updated in place; "
                "faster only for long outputs: docs/FINDINGS.md, 'Engines')")
    option(g, defaults, "--temperature", type=finite_number(float, gt=0))
    option(g, defaults, "--top-k", type=finite_number(int, ge=0),
           help="sample among the k likeliest tokens (0: the whole vocabulary); Hugging Face generate()'s default")
    option(g, defaults, "--seed", type=finite_number(int, ge=0), help="weight init and sampling seed")
    g.add_argument("--torch-threads", default=None,
                   help="N, 'auto' (the whole CPUs the process may use: its cpuset under its cgroups' CPU quota, "
                        "at least 1) or 'default' (torch's own); default: auto (the paper's labels: default)")
    option(g, defaults, "--engine-thread", choices=["caller", "one"],
           help="caller: each request runs on its caller's thread; one: the model is built and every request "
                "served on one thread, one at a time, as the paper's server (the paper's labels preset it)")
    option(g, defaults, "--omp-wait-policy", choices=["auto", "passive", "active", "unset"],
           help="OpenMP's OMP_WAIT_POLICY: auto (PASSIVE unless the environment sets it), passive, active, or unset "
                "(libgomp's default, as the paper's code ran; the paper's labels preset it)")
    option(g, defaults, "--batching", choices=["off", "dynamic"],
           help="dynamic: continuous batching (batch_engine.py)")
    option(g, defaults, "--max-batch", type=COUNT)
    g = p.add_argument_group(
        "admission", "gate (the paper): before each request read the pressure; while it is over --psi-threshold "
        "sleep --psi-interval-ms and read again, at most --psi-max-checks reads, then --on-timeout. limit: a "
        "FIFO concurrency limit of --concurrency-limit. adaptive: AIMD on the limit (+1 below "
        "--adaptive-low-pct pressure, halve at --adaptive-high-pct or when median service exceeds the minimum "
        "by --adaptive-tolerance), floor 1, ceiling --adaptive-max. Overload: with --max-waiting N, a request "
        "that would wait while N wait is refused at once (rejected, 'overloaded'; HTTP 503 + Retry-After); "
        "with --max-queue-delay-ms T, a request whose wait would exceed T is refused likewise (its control "
        "law: below).")
    option(g, defaults, "--admission", choices=["none", "gate", "limit", "adaptive"])
    g.add_argument("--psi-policy", choices=["gate", "adaptive"], default=None,
                   help="the pressure-driven admission (= --admission)")
    option(g, defaults, "--concurrency-limit", type=COUNT)
    option(g, defaults, "--psi-threshold", type=PERCENT, help="percent")
    option(g, defaults, "--psi-interval-ms", type=DURATION_MS)
    option(g, defaults, "--psi-max-checks", type=COUNT)
    option(g, defaults, "--on-timeout", choices=["admit", "reject"])
    option(g, defaults, "--psi-source", choices=["system", "cgroup"],
           help="/proc/pressure/cpu or the service cgroup's cpu.pressure")
    option(g, defaults, "--psi-signal", choices=["avg10", "total"],
           help="avg10, or the stall share over the last interval from total= deltas")
    option(g, defaults, "--psi-mode", choices=["poll", "trigger"])
    option(g, defaults, "--adaptive-low-pct", type=PERCENT)
    option(g, defaults, "--adaptive-high-pct", type=PERCENT)
    option(g, defaults, "--adaptive-tolerance", type=finite_number(float, gt=1))
    g.add_argument("--adaptive-max", type=COUNT, default=None,
                   help="the adaptive limit's ceiling (default: the generator's --concurrency, else "
                        f"{ServiceConfig.adaptive_max}; --max-batch when batching)")
    option(g, defaults, "--max-waiting", type=finite_number(int, ge=0),
           help="refuse a request that would wait for admission while this many wait (None: never)")
    option(g, defaults, "--max-queue-delay-ms", type=DURATION_MS,
           help="T: refuse (503, overloaded) a request whose wait for its first token would exceed T ms. "
                "Predicted: wait = (requests queued ahead, not yet at their first token) x (time between "
                "departures while busy, an EWMA with weight 0.2 to the newest; the first departure, the warm-up, is "
                "not counted); refused at arrival when wait > "
                "T, Retry-After = wait - T. Observed: a request still waiting for admission after T ms is "
                "refused then. One log line when shedding starts, one when it stops (None: never)")
    g = p.add_argument_group(
        "sharing", "share (control/sharing.py): every --share-interval-ms read 'others stall', the share of the "
        "interval in which other work on the host waited for CPU (siblings: the largest cpu.pressure some "
        "share among the service cgroup's v2 siblings; system: the system's some share minus the service "
        "cgroup's own throttled share; auto: siblings where there is a v2 cgroup); at or above "
        "--share-high-pct halve the service cgroup's own CPU quota (cpu.max / cfs_quota_us), not below "
        "--share-floor-pct; at or below --share-low-pct double it, not above --share-ceiling-pct; else keep "
        "it. It starts at the ceiling. One log line per change. Needs a cgroup made for the service.")
    option(g, defaults, "--sharing", choices=["off", "share"])
    option(g, defaults, "--share-floor-pct", type=finite_number(float, gt=0), help="percent of one CPU")
    option(g, defaults, "--share-ceiling-pct", type=finite_number(float, gt=0),
           help="percent of one CPU (None: every CPU of the host)")
    option(g, defaults, "--share-high-pct", type=PERCENT)
    option(g, defaults, "--share-low-pct", type=PERCENT)
    option(g, defaults, "--share-interval-ms", type=DURATION_MS)
    option(g, defaults, "--share-signal", choices=["auto", "siblings", "system"])


def resolve(a: dict, defaults=ServiceConfig, keep_none=()) -> None:
    """Apply --psi-policy, the --config preset and the dataclass defaults to parsed options ``a`` (in place),
    then check the service options. Precedence: an explicit option, the preset, the default."""
    policy = a.pop("psi_policy", None)
    if policy is not None and a.get("admission") is None:
        a["admission"] = policy
    if a["config"] not in configs.CONFIGS:
        raise UsageError(f"unknown config {a['config']!r} (choose from {', '.join(configs.CONFIGS)})")
    explicit = {key for key, value in a.items() if value is not None}
    for key, value in configs.preset(a["config"]).items():
        if a.get(key) is None:
            a[key] = value
    if "dtype" in explicit and "quantize" not in explicit and a["dtype"] != "float32":
        a["quantize"] = "none"   # a preset's int8 goes with float32 only: an explicit other dtype drops it
        if "engine" not in explicit and a.get("engine") == "ort":
            a["engine"] = "loop"  # likewise a preset's ort engine (float32 and int8 only)
    fallback = defaults()
    for key, value in a.items():
        if value is None and key not in keep_none:
            a[key] = getattr(fallback, key)
    if not a["adaptive_low_pct"] < a["adaptive_high_pct"]:
        raise UsageError(f"need --adaptive-low-pct < --adaptive-high-pct, got "
                         f"{a['adaptive_low_pct']} and {a['adaptive_high_pct']}")
    if not a["share_low_pct"] < a["share_high_pct"]:
        raise UsageError(f"need --share-low-pct < --share-high-pct, got {a['share_low_pct']} and {a['share_high_pct']}")
    if a["share_ceiling_pct"] is not None and a["share_ceiling_pct"] < a["share_floor_pct"]:
        raise UsageError(f"need --share-floor-pct <= --share-ceiling-pct, got {a['share_floor_pct']} and "
                         f"{a['share_ceiling_pct']}")
    if a["torch_threads"] not in (None, "auto", "default"):
        if not str(a["torch_threads"]).isdigit() or int(a["torch_threads"]) < 1:
            raise UsageError(f"--torch-threads must be a positive integer, 'auto' or 'default', "
                             f"got {a['torch_threads']!r}")
    if a["quantize"] != "none" and a["dtype"] != "float32":
        raise UsageError(f"--quantize {a['quantize']} needs --dtype float32, got --dtype {a['dtype']}")
    if a["engine"] == "ort" and a["dtype"] != "float32":
        raise UsageError(f"--engine ort runs --dtype float32 (--quantize none or int8), not {a['dtype']}")
    if "ort_kv" in explicit and a["engine"] != "ort":
        raise UsageError(f"--ort-kv is an option of --engine ort, not of --engine {a['engine']}")
    if a["engine"] == "ort" and importlib.util.find_spec("onnxruntime") is None:
        raise UsageError("--engine ort needs onnxruntime, a dependency of llm-psi: pip install -e .")
    if a["engine"] == "generate" and a["batching"] != "off":
        raise UsageError("--engine generate cannot batch: the batching engine runs its own decode loop")
