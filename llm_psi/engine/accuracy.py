"""Accuracy guard of the engine's precisions: bfloat16 and int8 against float32 on the same seeded weights,
and of the ONNX Runtime forward (``--engine ort``, float32 and int8) against our float32 loop.

    python -m llm_psi.engine.accuracy --tiny        # the tiny config (seconds)
    python -m llm_psi.engine.accuracy --full        # the 124M architecture

For each precision, the model is built from the same seed as the float32 reference, and both read the same
token sequence: the prompt, then float32's own greedy continuation (teacher forcing). At each of ``steps``
steps we compare the next-token logits: the largest absolute difference over all steps and the vocabulary,
and whether the greedy (argmax) token equals float32's. Teacher forcing keeps one early divergence from
cascading into a different sequence, so every step compares like with like.

With random weights the logits are nearly flat (the largest float32 logit is reported beside the difference
for scale), so greedy agreement here is a harsh test: near-ties flip on tiny differences. Judging output
quality needs real weights (``--model``).
"""
from __future__ import annotations

import sys

from llm_psi import cli

PROMPT = "Explain the theory of relativity."
# (dtype, quantize[, engine]): the engine defaults to the loop engine; ``ort`` is ONNX Runtime's forward
VARIANTS = (("bfloat16", "none"), ("float32", "int8"), ("float32", "none", "ort"), ("float32", "int8", "ort"))
# The guard a precision must pass to become a default (config.SERVE_DEFAULTS, the batching presets): at
# least 95% of float32's greedy tokens, and no logit off by more than 0.25 (on the 124M architecture with
# random weights, float32's logits reach ~3.5; measured: bfloat16 0.033, int8 0.15, both 100% greedy).
GUARD_MAX_ABS_LOGIT_DIFF = 0.25
GUARD_GREEDY_AGREEMENT = 0.95


def _logits(engine, prompt_ids, steps: int, forced=None):
    """Next-token logits [steps, vocab] (float32) of ``engine`` reading the prompt, then the ``forced``
    tokens one at a time (None: its own greedy tokens). Returns (logits, the tokens fed after the prompt)."""
    torch = engine.torch
    step = engine._stepper(prompt_ids, steps)
    rows, tokens, token = [], [], prompt_ids
    with torch.inference_mode():
        for k in range(steps):
            logits = step(token).float()
            rows.append(logits[0])
            tokens.append(int(logits[0].argmax()) if forced is None else forced[k])
            token = torch.tensor([[tokens[-1]]])
    return torch.stack(rows), tokens


def guard(tiny: bool = False, seed: int = 0, steps: int = 50, prompt: str = PROMPT, variants=VARIANTS,
          model: str | None = None) -> list[dict]:
    """One row per precision in ``variants`` ((dtype, quantize) pairs, or (dtype, quantize, engine) with an
    engine kind of ``loop.make_engine``): the largest absolute logit difference from the loop engine in
    float32 over ``steps`` teacher-forced steps, the share of greedy tokens equal to float32's, and the largest
    absolute float32 logit (scale)."""
    from llm_psi.engine.loop import Engine, make_engine
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ref = Engine(model=model, tiny=tiny, seed=seed)
    ids = ref.encode(prompt)
    ref_logits, greedy = _logits(ref, ids, steps)
    ref_argmax = ref_logits.argmax(dim=-1)
    rows = []
    for dtype, quantize, *kind in variants:
        engine = kind[0] if kind else "loop"
        other = make_engine(engine, model=model, tiny=tiny, seed=seed, dtype=dtype, quantize=quantize)
        logits, _ = _logits(other, ids, steps, greedy)
        rows.append({"engine": engine, "dtype": dtype, "quantize": quantize, "steps": steps,
                     "max_abs_logit_diff": float((logits - ref_logits).abs().max()),
                     "greedy_agreement": float((logits.argmax(dim=-1) == ref_argmax).float().mean()),
                     "max_abs_logit_float32": float(ref_logits.abs().max()),
                     "teacher_forced": True})
        rows[-1]["within_guard"] = within_guard(rows[-1])
    return rows


def within_guard(row: dict) -> bool:
    return (row["max_abs_logit_diff"] <= GUARD_MAX_ABS_LOGIT_DIFF
            and row["greedy_agreement"] >= GUARD_GREEDY_AGREEMENT)


def table(rows: list[dict]) -> str:
    lines = [f"{'engine':<6} {'dtype':<9} {'quantize':<8} {'steps':>5} {'max |dlogit|':>12} {'greedy agree':>12} "
             f"{'max |logit| f32':>15} {'guard':>5}"]
    for r in rows:
        lines.append(f"{r.get('engine', 'loop'):<6} {r['dtype']:<9} {r['quantize']:<8} {r['steps']:>5} "
                     f"{r['max_abs_logit_diff']:>12.4g} "
                     f"{r['greedy_agreement']:>12.1%} {r['max_abs_logit_float32']:>15.4g} "
                     f"{'ok' if r['within_guard'] else 'FAIL':>5}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = cli.OneLineParser(prog="python -m llm_psi.engine.accuracy", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--tiny", action="store_true", help="tiny GPT-2 config")
    size.add_argument("--full", action="store_true", help="the GPT-2 124M architecture")
    p.add_argument("--steps", type=cli.finite_number(int, ge=1), default=50, help="steps (default: %(default)s)")
    p.add_argument("--seed", type=cli.finite_number(int, ge=0), default=0,
                   help="weight init seed (default: %(default)s)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    rows = guard(tiny=a.tiny, seed=a.seed, steps=a.steps)
    print(f"{'tiny config' if a.tiny else 'GPT-2 124M architecture'}, seed {a.seed}, random weights, "
          f"teacher-forced on float32's greedy sequence")
    print(table(rows))
    print(f"guard: max |dlogit| <= {GUARD_MAX_ABS_LOGIT_DIFF}, greedy agreement >= {GUARD_GREEDY_AGREEMENT:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
