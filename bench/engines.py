"""Tokens per CPU-second of our engine and its peers, every dtype/quantize and batch size, beside the roofline.

    python -m bench.engines                          # full run (long): results/engines/
    python -m bench.engines --quick --tiny --output-dir /tmp/e --no-quota
    python -m bench.engines --capacity-only --force  # only the capacity over HTTP (bench/engines_capacity.py)
    python -m bench.engines --pairs 10 --output-dir results/engines --force   # ours-ort / ONNX Runtime in turn

In one run, on one thread (torch, OpenMP, MKL, ONNX Runtime and CTranslate2 all set to 1):

- engines: ``ours`` (the decode loop at batch 1, the continuous-batching engine above it at b > 1: b requests
  queued at once with ``BatchEngine.generate_many``, so that they prefill together and decode in step, as
  the peers' static batch; until 2026-12-07 b threads released by a barrier submitted them, and the
  scheduler, woken by the first, ran it alone for a step before the others joined), ``ours-ort`` (the same
  with ONNX Runtime as the forward, ``--engine ort``, the serving default: its KV cache concatenated per step),
  ``ours-ort-shared`` (the same, ``--ort-kv shared``: the cache updated in place; at commit 9cfa34b this was
  ``ours-ort``, and ``ours-ort-concat`` the default's), ``hf-generate``
  (Hugging Face ``generate()`` on a static batch), ``onnxruntime`` (past KV) and ``ctranslate2``, all on
  our seeded GPT-2 weights (``llm_psi.engine.peers``; their packages come from
  bench/requirements-peers.txt, and a peer that is missing is skipped with the reason; the saved and
  converted weights are kept in $LLM_PSI_PEER_CACHE, default <tmp>/llm-psi-peers, for the next run);
- settings: ours float32, bfloat16 and int8 (the engine's ``dtype``/``quantize`` options; an engine without
  them is skipped with the reason), hf-generate float32 and bfloat16, onnxruntime and ctranslate2 float32 and
  int8;
- every batch size of --batches, each b copies of one prompt for exactly --tokens new tokens, after an untimed
  warm-up; --repeats timed runs, the median kept. tokens_per_cpu_s = new tokens / CPU seconds of the whole
  process (time.process_time, prefill included); wall time is recorded too;
- unconstrained, then (as root) the same inside a cgroup at 50% of one CPU: this command re-runs itself under
  ``cgroup_lib.py run --name bench_engines --cpu-quota 50``; not root, those rows are skipped with a message;
- the roofline, measured in the same run (unconstrained, per CPU-second): stream-copy bandwidth BW and the
  matmul peak P[d] of each dtype (x[64,768] @ w[768,3072]).
  roofline_tokens_per_cpu_s(b) = min(b * BW / W, P[d] / F), W = weight bytes read per decode step (matmul
  parameters x 4, 2 or 1 bytes for float32, bfloat16, int8), F = FLOP per token (2 x matmul parameters + the
  attention's); the first term binds at batch 1, the second at 16 and above. roofline_fraction = measured /
  roofline;
- the accuracy guard of ours in bfloat16 and int8 against float32, over --guard-steps teacher-forced steps
  (the float32 greedy continuation): the largest absolute logit difference, and the share of steps whose
  greedy token equals float32's (and ours-ort, float32 and int8, by llm_psi.engine.accuracy). Random weights
  say little about quality: that needs real weights;
- the service's capacity over HTTP (unless --no-capacity; bench/engines_capacity.py): ``llm_server.py serve
  --config batch`` with today's engine (``ours``, --engine loop) and the new default (``ours-ort``), under the
  quota as root, probed by the load generator at Poisson rates; the highest rate whose p95 TTFT and p95
  end-to-end time stay within --slo, per trial, mean and 95% interval over --capacity-trials.

Writes, in --output-dir: summary.csv (engine, dtype, quantize, batch, constrained, tokens_per_cpu_s,
roofline_tokens_per_cpu_s, roofline_fraction), runs.csv (every timed run: wall and CPU seconds), accuracy.csv,
roofline.json, table.md and engines.png; capacity.csv (engine, slo, capacity_rps, ci_lo, ci_hi, n_trials),
capacity_probes.csv and capacity.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench import engines_capacity, engines_pairs
from llm_psi import REPO
from llm_psi.cli import OneLineParser, finite_number, int_list, word_list

PROG = "python -m bench.engines"
ENGINES = ("ours", "ours-ort", "ours-ort-shared", "hf-generate", "onnxruntime", "ctranslate2")
TABLE = tuple(e for e in ENGINES if e != "ours-ort-shared")   # the table's engines; the in-place KV for --pair
OURS = [("float32", "none"), ("bfloat16", "none"), ("float32", "int8")]
OURS_ORT = [("float32", "none"), ("float32", "int8")]   # our engine on ONNX Runtime's forward (--engine ort)
PROMPT = "Explain the theory of relativity."
QUOTA_PCT = 50
OUTPUTS = ("summary.csv", "runs.csv", "accuracy.csv", "roofline.json", "table.md", "engines.png")


class Skip(Exception):
    """A setting that cannot run here; the message says why."""


def build_parser():
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=word_list(ENGINES), default=list(TABLE), metavar="LIST",
                   help=f"engines to measure, of {' '.join(ENGINES)} (default: {' '.join(TABLE)})")
    p.add_argument("--batches", type=int_list, metavar="LIST", help="batch sizes (default: 1 8 16 32)")
    p.add_argument("--tokens", type=finite_number(int, ge=1), help="new tokens per sequence (default: 50)")
    p.add_argument("--repeats", type=finite_number(int, ge=1), help="timed runs per row, the median kept (default: 3)")
    p.add_argument("--guard-steps", type=finite_number(int, ge=1), help="steps of the accuracy guard (default: 50)")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: the defaults become 5 tokens, batches 1 and 8, 1 repeat, 5 guard steps")
    p.add_argument("--no-quota", action="store_true", help="skip the rows under the 50%% CPU quota")
    p.add_argument("--output-dir", default=os.path.join("results", "engines"),
                   help="where the outputs go (default: results/engines)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--pairs", type=finite_number(int, ge=2), default=None, metavar="N",
                   help="instead of the table: N rounds of two settings in turn per batch size, their ratio with "
                        "an interval (bench/engines_pairs.py), unconstrained and under the quota")
    p.add_argument("--pair", default=engines_pairs.DEFAULT, help="the two settings of --pairs (default: %(default)s)")
    p.add_argument("--inner", metavar="JSON", help=argparse.SUPPRESS)  # the run under the quota writes here
    engines_capacity.add_options(p)
    return p


def log(args, text):
    if not args.quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def settings(engines) -> list[tuple[str, str, str]]:
    from llm_psi.engine.peers import SETTINGS
    table = {"ours": OURS, "ours-ort": OURS_ORT, "ours-ort-shared": OURS_ORT}
    return [(e, d, q) for e in engines for d, q in table.get(e) or SETTINGS[e]]


def timed(fn):
    cpu0, wall0 = time.process_time(), time.monotonic()
    n = fn()
    return n, time.monotonic() - wall0, time.process_time() - cpu0


def our_engine(tiny: bool, dtype: str, quantize: str, kind: str = "loop", kv: str = "concat"):
    """make_engine with only the options that differ from the default, so it works on engines without them."""
    from llm_psi.engine.loop import make_engine
    extra = {k: v for k, v in (("dtype", dtype), ("quantize", quantize), ("kv", kv))
             if v not in ("float32", "none", "concat")}
    try:
        return make_engine(kind, tiny=tiny, seed=0, torch_threads=1, **extra)
    except ImportError as e:      # the ort engine without onnxruntime
        raise Skip(str(e)) from None
    except (TypeError, ValueError) as e:
        raise Skip(f"the engine rejects dtype={dtype} quantize={quantize} ({type(e).__name__}: {e})") from None


def runner(engine: str, dtype: str, quantize: str, tiny: bool):
    """A callable (batch, tokens, seed) -> new tokens for one setting; Skip where it cannot run."""
    if engine in ("ours", "ours-ort", "ours-ort-shared"):
        from llm_psi.engine.batch import BatchEngine
        eng = our_engine(tiny, dtype, quantize, kind="loop" if engine == "ours" else "ort",
                         kv="shared" if engine == "ours-ort-shared" else "concat")

        def run(batch, tokens, seed):
            if batch == 1:
                return eng.generate(PROMPT, tokens, seed=seed).output_tokens
            be = BatchEngine(eng, max_batch=batch)      # a static batch on the serving path, as the peers'
            try:
                gens = be.generate_many([PROMPT] * batch, tokens, seeds=range(seed * batch, (seed + 1) * batch))
            finally:
                be.close()
            return sum(g.output_tokens for g in gens)
        return run
    from transformers import AutoTokenizer
    from llm_psi.engine import peers
    try:
        peer = peers.make_peer(engine, tiny=tiny, dtype=dtype, quantize=quantize, threads=1)
    except peers.PeerUnavailable as e:
        raise Skip(str(e)) from None
    ids = AutoTokenizer.from_pretrained(peers.hf_dir(tiny)).encode(PROMPT)
    return lambda batch, tokens, seed: peer.generate_batch(ids, batch, tokens, seed=seed)


def measure(args, constrained: bool) -> tuple[list[dict], list[str]]:
    """Every setting x batch: the timed runs (raw rows), and the settings skipped with their reasons."""
    import gc
    rows, skipped = [], []
    combos = settings(args.engines)
    for i, (engine, dtype, quantize) in enumerate(combos, 1):
        name = f"{engine} {dtype}/{quantize}"
        try:
            run = runner(engine, dtype, quantize, args.tiny)
        except Skip as e:
            skipped.append(f"{name}: {e}")
            log(args, f"[{i}/{len(combos)}] {name}: skipped: {e}")
            continue
        for b in sorted({1, max(args.batches)}):
            run(b, 2, 0)  # warm-up, untimed
        for b in args.batches:
            for rep in range(args.repeats):
                n, wall, cpu = timed(lambda: run(b, args.tokens, rep + 1))
                if n != b * args.tokens:
                    raise RuntimeError(f"{name} batch {b}: {n} tokens, expected {b * args.tokens}")
                rows.append(dict(engine=engine, dtype=dtype, quantize=quantize, batch=b, constrained=constrained,
                                 repeat=rep, tokens=n, wall_s=round(wall, 4), cpu_s=round(cpu, 4),
                                 tokens_per_s=round(n / wall, 3), tokens_per_cpu_s=round(n / cpu, 3)))
            log(args, f"[{i}/{len(combos)}] {name} batch {b}{' (quota)' if constrained else ''}: "
                      f"{rows[-1]['tokens_per_cpu_s']:.1f} tokens/CPU-s")
        del run
        gc.collect()
    return rows, skipped


def run_under_quota(args, argv) -> tuple[list[dict], list[str], str | None]:
    """This command again inside a cgroup at 50% of one CPU; (rows, skipped, why not run)."""
    if os.geteuid() != 0:
        return [], [], "not root: cannot create the cgroup"
    fd, path = tempfile.mkstemp(prefix="bench-engines-", suffix=".json")
    os.close(fd)
    try:
        cmd = [sys.executable, os.path.join(REPO, "cgroup_lib.py"), "run", "--name", "bench_engines",
               "--cpu-quota", str(QUOTA_PCT), "--", sys.executable, "-m", "bench.engines", *argv, "--inner", path]
        status = subprocess.call(cmd, cwd=REPO)
        if status != 0:
            raise RuntimeError(f"the run under the quota failed (exit status {status})")
        with open(path) as f:
            inner = json.load(f)
    finally:
        os.remove(path)
    if not inner["quota_cores"]:
        raise RuntimeError("the run under the quota saw no CPU quota")
    return inner["rows"], inner["skipped"], None


def check_outputs(args):
    if not os.path.isdir(args.output_dir) and os.path.exists(args.output_dir):
        raise SystemExit(f"{PROG}: error: {args.output_dir} is not a directory")
    names = (() if args.capacity_only else OUTPUTS) + (() if args.no_capacity else engines_capacity.OUTPUTS)
    for name in names:
        path = os.path.join(args.output_dir, name)
        if os.path.exists(path) and not args.force:
            print(f"{PROG}: error: {path} exists; use --force to overwrite it", file=sys.stderr)
            sys.exit(2)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    for name, full, quick in (("batches", [1, 8, 16, 32], [1, 8]), ("tokens", 50, 5), ("repeats", 3, 1),
                              ("guard_steps", 50, 5)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"   # before torch is imported
    engines_capacity.defaults(args)
    bad = engines_capacity.check(args)
    if bad:
        print(f"{PROG}: error: {bad}", file=sys.stderr)
        return 2
    args.engine_names = ENGINES
    if args.pairs:
        try:
            pair = engines_pairs.parse(args.pair, ENGINES)
        except ValueError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
    import torch
    torch.set_num_threads(1)
    if args.inner:
        from llm_psi import cgroups
        rows, skipped = (engines_pairs.measure(args, True, runner, timed, log), []) if args.pairs else \
            measure(args, constrained=True)
        with open(args.inner, "w") as f:
            json.dump({"rows": rows, "skipped": skipped, "quota_cores": cgroups.cpu_quota_cores()}, f)
        return 0
    if args.pairs:
        return pairs(args, argv, pair)
    check_outputs(args)
    if args.capacity_only:
        print("\n".join(capacity(args)))
        return 0
    from bench import engines_report, roofline
    log(args, "measuring the roofline (bandwidth, matmul peaks)")
    roof = roofline.measure(args.tiny)
    rows, skipped = measure(args, constrained=False)
    try:
        quota_rows, quota_skipped, why = ([], [], "--no-quota given") if args.no_quota else \
            run_under_quota(args, argv)
    except RuntimeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if why:
        print(f"{PROG}: rows under the quota skipped: {why}", file=sys.stderr)
    log(args, f"accuracy guard over {args.guard_steps} steps")
    guard = engines_report.accuracy_guard(args.tiny, args.guard_steps, our_engine, ort="ours-ort" in args.engines)
    os.makedirs(args.output_dir, exist_ok=True)
    skipped = list(dict.fromkeys(skipped + quota_skipped))
    table = engines_report.write(args, rows + quota_rows, skipped, why, roof, guard)
    if not args.no_capacity:
        table += "\n".join(["", *capacity(args), ""])
        with open(os.path.join(args.output_dir, "table.md"), "w") as f:
            f.write(table)
    print(table, end="")
    return 0


def pairs(args, argv, pair) -> int:
    """--pairs: the two settings in turn, unconstrained and (as root) under the quota; pairs*.csv and pairs.md."""
    for fname in engines_pairs.OUTPUTS:
        path = os.path.join(args.output_dir, fname)
        if os.path.exists(path) and not args.force:
            print(f"{PROG}: error: {path} exists; use --force to overwrite it", file=sys.stderr)
            return 2
    try:
        rows = engines_pairs.measure(args, False, runner, timed, log)
        quota_rows, _, why = ([], [], "--no-quota given") if args.no_quota else run_under_quota(args, argv)
    except Skip as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if why:
        print(f"{PROG}: rows under the quota skipped: {why}", file=sys.stderr)
    print(engines_pairs.write(args.output_dir, rows + quota_rows, pair), end="")
    return 0


def capacity(args) -> list[str]:
    """The capacity study (bench/engines_capacity.py) under the quota as root, else unconstrained (said so);
    writes its files and capacity.md; returns the lines of its table."""
    constrained = not args.no_quota and os.geteuid() == 0
    if not constrained:
        print(f"{PROG}: capacity measured without the quota: {'--no-quota given' if args.no_quota else 'not root'}",
              file=sys.stderr)
    os.makedirs(args.output_dir, exist_ok=True)
    caps, probes = engines_capacity.measure(args, constrained, lambda text: log(args, text))
    lines = engines_capacity.write(args, caps, probes)
    with open(os.path.join(args.output_dir, "capacity.md"), "w") as f:
        f.write("\n".join(lines + [""]))
    return lines


if __name__ == "__main__":
    sys.exit(main())
