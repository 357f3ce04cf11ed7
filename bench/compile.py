"""Does torch.compile pay for itself in our decode step? One thread, float32, the 124M architecture (or --tiny).

    python -m bench.compile [--batches "1 16"] [--tokens 20] [--repeats 3]

For each batch size: our batched decode step (engine.net.DecodeBatch) eager, and the same step with every
transformer block's dense part compiled by torch.compile (inductor): layer norm 1 + the QKV projection, the
attention output projection + residual, and layer norm 2 + the MLP + residual, each one compiled function
over tensors (dynamic shapes, so one graph serves every block and batch). Attention over the KV cache stays
eager. The compiled step's logits are checked against the eager step's. Reports tokens per CPU-second of
each (after an untimed warm-up, median of --repeats runs of --tokens steps), the speed-up, and the time the
first compiled step took (compilation). Where torch.compile fails (no C++ compiler, say) it says so.
"""
from __future__ import annotations

import statistics
import sys
import time

from llm_psi.cli import OneLineParser, finite_number, int_list

PROMPT = "Explain the theory of relativity."


def dense_parts():
    """The three dense parts of a block as plain functions of tensors (GPT-2 Conv1D weights are [in, out])."""
    import torch
    import torch.nn.functional as F

    def qkv(h, lw, lb, w, b):
        return torch.addmm(b, F.layer_norm(h, (h.shape[-1],), lw, lb, 1e-5), w)

    def out(h, a, w, b):
        return h + torch.addmm(b, a, w)

    def mlp(h, lw, lb, fw, fb, pw, pb):
        x = F.gelu(torch.addmm(fb, F.layer_norm(h, (h.shape[-1],), lw, lb, 1e-5), fw), approximate="tanh")
        return h + torch.addmm(pb, x, pw)
    return qkv, out, mlp


def compiled_blocks(fwd, parts):
    """A replacement for Forward.blocks that calls the (compiled) dense parts."""
    qkv, out, mlp = parts

    def blocks(h, attend):
        for i, block in enumerate(fwd.model.transformer.h):
            a, m = block.attn, block.mlp
            q, k, v = qkv(h, block.ln_1.weight, block.ln_1.bias, a.c_attn.weight, a.c_attn.bias).split(
                fwd.embed_dim, dim=1)
            h = out(h, attend(i, block, q, k, v), a.c_proj.weight, a.c_proj.bias)
            h = mlp(h, block.ln_2.weight, block.ln_2.bias, m.c_fc.weight, m.c_fc.bias, m.c_proj.weight,
                    m.c_proj.bias)
        return h
    return blocks


def decode(engine, fwd, batch: int, tokens: int) -> tuple[float, object]:
    """Prefill `batch` prompts, then `tokens` greedy steps; (CPU seconds of the steps, the first step's logits)."""
    import torch
    from llm_psi.engine.net import DecodeBatch
    ids = engine.encode(PROMPT).repeat(batch, 1)
    db = DecodeBatch(fwd)
    with torch.inference_mode():
        logits, rows = db.prefill_many(ids)
        db.add(*rows)
        nxt, first = logits.argmax(-1, keepdim=True), None
        cpu = time.process_time()
        for _ in range(tokens):
            logits = db.step(nxt)
            first = logits if first is None else first
            nxt = logits.argmax(-1, keepdim=True)
        return time.process_time() - cpu, first


def measure(args) -> list[dict]:
    import torch
    from llm_psi.engine.loop import make_engine
    from llm_psi.engine.net import Forward
    torch.set_num_threads(1)
    engine = make_engine("loop", tiny=args.tiny, seed=0, torch_threads=1)
    eager, comp = Forward(engine.model), Forward(engine.model)
    failure = None
    try:
        comp.blocks = compiled_blocks(comp, [torch.compile(f, dynamic=True) for f in dense_parts()])
        t0 = time.monotonic()
        decode(engine, comp, 1, 1)
        compile_s = time.monotonic() - t0
    except Exception as e:   # inductor needs a C++ compiler, and may reject an op: that is the answer
        failure, compile_s = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", float("nan")
    rows = []
    for b in args.batches:
        row = {"batch": b, "tokens": args.tokens, "compile_first_step_s": round(compile_s, 2)}
        for name, fwd in (("eager", eager), ("compiled", comp)):
            if name == "compiled" and failure:
                row.update(compiled_tokens_per_cpu_s=None, speedup=None, max_abs_logit_diff=None, failure=failure)
                continue
            decode(engine, fwd, b, 2)   # warm-up (and, compiled, any recompilation for this batch)
            cpu = [decode(engine, fwd, b, args.tokens)[0] for _ in range(args.repeats)]
            row[f"{name}_tokens_per_cpu_s"] = round(b * args.tokens / statistics.median(cpu), 1)
        if not failure:
            diff = (decode(engine, eager, b, 1)[1] - decode(engine, comp, b, 1)[1]).abs().max().item()
            row.update(speedup=round(row["compiled_tokens_per_cpu_s"] / row["eager_tokens_per_cpu_s"], 3),
                       max_abs_logit_diff=diff, failure=None)
        rows.append(row)
        print(f"batch {b}: {row}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m bench.compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int_list, default=[1, 16], metavar="LIST", help="(default: 1 16)")
    p.add_argument("--tokens", type=finite_number(int, ge=1), default=20, help="steps per run (default: 20)")
    p.add_argument("--repeats", type=finite_number(int, ge=1), default=3, help="runs per setting (default: 3)")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-2 config (tests)")
    a = p.parse_args(argv)
    import json
    for row in measure(a):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
